"""Training and serving agree exactly: same drop rule, positions, hidden-state convention, and
the same drafter function; and the offline evaluator counts acceptance exactly like vLLM."""

import json

import numpy as np
import pytest
import torch

from hivis_testbed import assets
from hivis_testbed.tinyworld.dataset import sample
from vllm_hivis.method.hide import is_dropped
from vllm_hivis.serving.acceptance import from_llm_metrics
from vllm_hivis.serving.trace import load_traces
from vllm_hivis.train.data import image_spans
from vllm_hivis.train.drafters import HiViSDrafter
from vllm_hivis.train.evaluate import evaluate, intermediate_layers
from vllm_hivis.train.examples import make_example
from vllm_hivis.train.prompts import PromptItem
from vllm_hivis.train.target import HFTarget
from vllm_hivis.train.trainer import frozen_target_parts

from .helpers import engine, hivis_spec, image_size, text_prompt, traced_rows

pytestmark = pytest.mark.e2e
K = 3


def items():
    size = image_size()
    out = [PromptItem(f"d{i}", s.qa.question, s.image) for i, s in
           enumerate(sample("test", 300 + i, size, kind="describe") for i in range(3))]
    s = sample("test", 310, size, kind="where")
    out.append(PromptItem("q", s.qa.question, s.image))
    out.append(PromptItem("t", "How many shapes are there?", None))
    return out


def vllm_prompt(it):
    p = {"prompt": text_prompt(it.question, n_images=0 if it.image is None else 1)}
    if it.image is not None:
        p["multi_modal_data"] = {"image": it.image}
    return p


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Greedy hivis run with the drafter trace on; small chunks so windows end inside images."""
    from vllm import SamplingParams

    trace = tmp_path_factory.mktemp("trace")
    with engine(speculative_config=hivis_spec(k=K), max_num_batched_tokens=32, enable_chunked_prefill=True,
                env={"VLLM_HIVIS_TRACE_DIR": str(trace)}) as llm:
        outs = llm.generate([vllm_prompt(it) for it in items()], SamplingParams(temperature=0.0, max_tokens=160),
                            use_tqdm=False)
        acc = from_llm_metrics(llm.get_metrics())
    return outs, acc, load_traces(trace)


def test_training_examples_equal_what_the_drafter_saw(served):
    outs, _, traces = served
    target = HFTarget(assets.tiny_target())
    drafter = HiViSDrafter.from_pretrained(assets.tiny_drafter()).eval()
    embed, lm_head, _ = frozen_target_parts(assets.tiny_target())
    checked = 0
    for it, o in zip(items(), outs):
        ids = torch.tensor(list(o.prompt_token_ids) + list(o.outputs[0].token_ids))
        prompt, pixels = target.encode(it)
        assert ids[: len(prompt)].tolist() == prompt.tolist()  # vLLM and training tokenise alike
        from transformers import DynamicCache

        inter = intermediate_layers(drafter)  # a multi-layer drafter's other target layers (else none)
        hidden, _, _ = target.forward(ids, DynamicCache(), pixels, inter)
        spans = image_spans(prompt.tolist(), target.image_token_id)
        rec = {"input_ids": ids, "hidden": hidden, "prompt_len": len(prompt), "spans": spans,
               "image_embeds": torch.zeros(0, hidden.shape[1]), "feature_layers": inter,
               "layers": target.layer_states if inter else None}
        ex = drafter.example(rec)  # what training feeds the drafter for this sequence
        assert ex["target_rows"].tolist() == make_example(rec, "text")["target_rows"].tolist()  # the drop rule
        with torch.no_grad():
            ex["features"] = drafter.combine_features(ex["features"])  # [N, H] (identity for a last-layer drafter)
        tr = traced_rows(traces, o.request_id)
        real = ~tr["is_dummy"].astype(bool)
        # the drafter never ran on a dropped row (an image placeholder as input)
        assert not is_dropped(spans, tr["target_pos"][real].astype(np.int64)).any()
        by_pos = {}
        for j in np.flatnonzero(real):
            p = int(tr["target_pos"][j])
            if p < len(ids) - 1 and int(tr["input_ids"][j]) == int(ids[p + 1]):
                by_pos[p] = j  # the last time vLLM ran row p with its verified token
        rows = ex["target_rows"].tolist()
        assert set(by_pos) == set(rows)  # the same rows ...
        sel = [by_pos[p] for p in rows]
        assert tr["drafter_pos"][sel].tolist() == ex["positions"].tolist()  # ... at the same positions
        assert tr["input_ids"][sel].tolist() == ex["input_ids"].tolist()
        # (a multi-layer feature passes one more fp32 GEMM: a looser absolute tolerance)
        np.testing.assert_allclose(tr["features"][sel], ex["features"].numpy(), atol=2e-3 if inter else 2e-4,
                                   rtol=1e-3)
        with torch.no_grad():  # the torch twin reproduces vLLM's drafter outputs (hence logits)
            out = drafter(embed(ex["input_ids"])[None], ex["features"][None], ex["positions"][None])[0]
        np.testing.assert_allclose(tr["out_features"][sel], out.numpy(), atol=2e-3, rtol=1e-3)
        assert torch.equal(lm_head(torch.from_numpy(tr["out_features"][sel])).argmax(-1), lm_head(out).argmax(-1))
        checked += len(rows)
    assert checked > 150  # every kept row of 5 requests (prompt and answer)


def test_offline_evaluator_counts_like_vllm(served):
    outs, acc_vllm, _ = served
    acc_off, gen = evaluate(assets.tiny_target(), assets.tiny_drafter(), items(), k=K, max_tokens=160,
                            progress=False)
    assert gen == [list(o.outputs[0].token_ids) for o in outs]
    assert (acc_off.num_drafts, acc_off.num_draft_tokens, acc_off.num_accepted) == \
        (acc_vllm.num_drafts, acc_vllm.num_draft_tokens, acc_vllm.num_accepted)
    assert acc_off.per_position_counts == acc_vllm.per_position_counts
    print(f"\nvLLM and offline replay agree: {json.dumps(acc_off.summary())}")


# -- multi-layer drafters (feature_layers): vLLM's auxiliary hidden states == the training twin's ----
ML_LAYERS = [1, 2, 4]  # of the tiny target's 4 layers: two intermediate ones and the final normed state


def multi_layer_drafter(out_dir) -> str:
    """A randomly initialised multi-layer hivis drafter for the tiny target (step biases on): parity
    holds for any weights, and random ones exercise every path (nothing is near zero)."""
    from pathlib import Path

    from vllm_hivis.method.checkpoint import DrafterSpec

    tcfg = json.loads((Path(assets.tiny_target()) / "config.json").read_text())["text_config"]
    spec = DrafterSpec(hidden_size=tcfg["hidden_size"], vocab_size=tcfg["vocab_size"], step_bias_steps=2,
                       feature_layers=ML_LAYERS, num_target_layers=tcfg["num_hidden_layers"])
    torch.manual_seed(0)
    d = HiViSDrafter.for_target(tcfg, spec)
    with torch.no_grad():
        d.step_bias.normal_(0, 0.5)
    return str(d.export(out_dir, target=assets.tiny_target()))


@pytest.fixture(scope="module")
def served_multi_layer(tmp_path_factory):
    from vllm import SamplingParams

    drafter = multi_layer_drafter(tmp_path_factory.mktemp("ml-drafter"))
    trace = tmp_path_factory.mktemp("ml-trace")
    with engine(speculative_config=hivis_spec(k=K, drafter=drafter), max_num_batched_tokens=32,
                enable_chunked_prefill=True, env={"VLLM_HIVIS_TRACE_DIR": str(trace)}) as llm:
        outs = llm.generate([vllm_prompt(it) for it in items()], SamplingParams(temperature=0.0, max_tokens=48),
                            use_tqdm=False)
        acc = from_llm_metrics(llm.get_metrics())
    return drafter, outs, acc, load_traces(trace)


def test_multi_layer_drafter_matches_its_training_twin(served_multi_layer):
    """The features vLLM's runner collects (auxiliary hidden states, combined by the drafter with the
    target's own final norm) equal feature_fc over transformers' layers as training records them,
    row for row; and the twin reproduces vLLM's drafter outputs from them."""
    drafter_dir, outs, _, traces = served_multi_layer
    target = HFTarget(assets.tiny_target())
    drafter = HiViSDrafter.from_pretrained(drafter_dir).eval()
    assert drafter.spec.feature_layers == ML_LAYERS
    embed, _, _ = frozen_target_parts(assets.tiny_target())
    inter = tuple(i for i in ML_LAYERS if i < 4)
    checked = 0
    for it, o in zip(items(), outs):
        ids = torch.tensor(list(o.prompt_token_ids) + list(o.outputs[0].token_ids))
        prompt, pixels = target.encode(it)
        from transformers import DynamicCache

        hidden, _, _ = target.forward(ids, DynamicCache(), pixels, inter)
        rec = {"input_ids": ids, "hidden": hidden, "prompt_len": len(prompt), "layers": target.layer_states,
               "feature_layers": inter, "spans": image_spans(prompt.tolist(), target.image_token_id),
               "image_embeds": torch.zeros(0, hidden.shape[1])}
        ex = drafter.example(rec)
        assert ex["features"].shape[1] == len(ML_LAYERS) * hidden.shape[1]
        tr = traced_rows(traces, o.request_id)
        by_pos = {}
        for j in np.flatnonzero(~tr["is_dummy"].astype(bool)):
            p = int(tr["target_pos"][j])
            if p < len(ids) - 1 and int(tr["input_ids"][j]) == int(ids[p + 1]):
                by_pos[p] = j
        rows = ex["target_rows"].tolist()
        assert set(by_pos) == set(rows)
        sel = [by_pos[p] for p in rows]
        with torch.no_grad():
            f = drafter.combine_features(ex["features"])
            out = drafter(embed(ex["input_ids"])[None], f[None], ex["positions"][None])[0]
        np.testing.assert_allclose(tr["features"][sel], f.numpy(), atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(tr["out_features"][sel], out.numpy(), atol=5e-3, rtol=1e-3)
        checked += len(rows)
    assert checked > 100


def test_multi_layer_offline_evaluator_counts_like_vllm(served_multi_layer):
    """Offline replay of the multi-layer drafter (layers recorded by transformers) drafts exactly what
    vLLM drafted: same tokens (lossless either way) and the same acceptance counts."""
    drafter, outs, acc_vllm, _ = served_multi_layer
    acc_off, gen = evaluate(assets.tiny_target(), drafter, items(), k=K, max_tokens=48, progress=False)
    assert gen == [list(o.outputs[0].token_ids) for o in outs]
    assert (acc_off.num_drafts, acc_off.num_accepted) == (acc_vllm.num_drafts, acc_vllm.num_accepted)
    assert acc_off.per_position_counts == acc_vllm.per_position_counts
