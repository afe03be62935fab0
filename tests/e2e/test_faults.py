"""Faults: a drafter that raises, or computes NaN for one request, costs acceptance, never an
answer, and never touches another request; after an engine death the server behaves as stock
vLLM's does (it reports the engine dead and exits)."""

import json
import logging
import os
import signal
import time
import urllib.request

import psutil
import pytest
import torch

from hivis_testbed import assets
from hivis_testbed.server import VLLMServer

from .helpers import engine, hivis_spec, model_runner, prompt_set, token_ids

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reference(greedy):
    with engine() as llm:
        return token_ids(llm.generate(prompt_set(), greedy, use_tqdm=False))


def _wrap_region(drafter, hook):
    """Call hook(args, call_index) before every forward of the drafter's compiled region."""
    region = drafter.model.model
    forward, n = region.forward, [0]

    def wrapped(*args, **kwargs):
        hook(args, n[0])
        n[0] += 1
        return forward(*args, **kwargs)

    region.forward = wrapped
    return lambda: delattr(region, "forward")


def test_a_raising_drafter_falls_back_to_no_speculation(reference, greedy, caplog):
    def explode(_args, i):
        if i % 7 == 3:
            raise RuntimeError("injected drafter fault")

    with engine(speculative_config=hivis_spec(k=4), max_num_seqs=8) as llm:
        drafter = model_runner(llm).drafter
        undo = _wrap_region(drafter, explode)
        with caplog.at_level(logging.WARNING, logger="vllm_hivis.proposer"):
            out = token_ids(llm.generate(prompt_set(), greedy, use_tqdm=False))
        undo()
        failures = drafter.failures
    assert out == reference
    assert failures > 0 and "drafting failed" in caplog.text and "injected drafter fault" in caplog.text


def test_nan_in_one_request_touches_no_other(reference, greedy):
    """NaN features for one request's rows poison its own drafter KV: its outputs stay exact, and
    every other request drafts exactly as in a clean run of the same batch."""
    prompts = prompt_set()[:6]
    clean, poisoned = _run_poisoned(prompts, greedy, False), _run_poisoned(prompts, greedy, True)
    assert poisoned[0] == clean[0] == reference[:6]
    assert poisoned[1][1:] == clean[1][1:]  # the others: the same accepted tokens
    assert poisoned[1][0] < clean[1][0]  # the victim lost acceptance (and only acceptance)


def _run_poisoned(prompts, greedy, poisoned: bool):
    """(token ids, accepted drafts per request); poisoned: NaN features for the first request's
    rows in every first pass (its drafter KV rows are then NaN)."""
    with engine(speculative_config=hivis_spec(k=4), max_num_seqs=8, per_request_spec_decode_metrics="summary") as llm:
        runner = model_runner(llm)
        victim = []

        def poison(args, _i):
            plan = runner.drafter.last_plan
            if not poisoned or plan is None or int(args[3][0]) != 0:  # first passes only
                return
            for b, rid in enumerate(runner.input_batch.req_ids):
                if rid.startswith("0-"):  # the first request of the batch
                    rows = torch.from_numpy((plan.req_of_row == b).nonzero()[0])
                    args[2][rows] = float("nan")
                    victim.append(len(rows))

        undo = _wrap_region(runner.drafter, poison)
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        undo()
    assert victim or not poisoned
    return token_ids(outs), [accepted(o) for o in outs]


def accepted(output) -> int:
    m = output.outputs[0].spec_decode_metrics
    return sum(j * c for j, c in enumerate(m.histogram))


@pytest.mark.parametrize("spec", [None, "hivis"], ids=["stock", "hivis"])
def test_engine_death_is_handled_as_stock_vllm_handles_it(spec):
    args = [] if spec is None else ["--speculative-config", json.dumps(hivis_spec(k=3))]
    with VLLMServer(assets.tiny_target(), args) as srv:
        engines = [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "EngineCore" in p.name()
                   or any("EngineCore" in c for c in p.cmdline())]
        assert engines, [p.cmdline() for p in psutil.Process(srv.proc.pid).children(recursive=True)]
        os.kill(engines[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while srv.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert srv.proc.poll() is not None, "the API server kept running after its engine died"
        assert "EngineDeadError" in srv.tail(200) or "died" in srv.tail(200).lower()
        with pytest.raises(OSError):
            urllib.request.urlopen(srv.url + "/health", timeout=2)
