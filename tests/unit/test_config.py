"""Config validation: every bad hivis config fails with a message that says what is expected."""

import json
import types

import pytest
import torch

from vllm_hivis.method.checkpoint import DrafterSpec, read_spec
from vllm_hivis.serving.config import HiViSConfigError, check_against_target, check_user_dict
from vllm_hivis.train.drafters import HiViSDrafter


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128,
            "vocab_size": 100, "rms_norm_eps": 1e-5, "max_position_embeddings": 256}
    d = HiViSDrafter.for_target(text, DrafterSpec(hidden_size=64, vocab_size=100, step_bias_steps=2))
    return str(d.save_pretrained(tmp_path_factory.mktemp("drafter"), dtype=torch.float32))


def ok(drafter_dir, **kw):
    return {"method": "hivis", "model": drafter_dir, "num_speculative_tokens": 3, **kw}


def test_valid_config(drafter_dir):
    spec = check_user_dict(ok(drafter_dir))
    assert (spec.hidden_size, spec.vocab_size, spec.step_bias_steps) == (64, 100, 2)


@pytest.mark.parametrize("patch,match", [
    ({"model": None}, "needs 'model'"),
    ({"num_speculative_tokens": None}, "needs 'num_speculative_tokens'"),
    ({"num_speculative_tokens": 0}, "integer in 1..32"),
    ({"num_speculative_tokens": 33}, "integer in 1..32"),
    ({"num_speculative_tokens": "5"}, "integer in 1..32"),
    ({"num_speculative_tokens": True}, "integer in 1..32"),
    ({"draft_model_magic": 1}, r"unknown key\(s\) \['draft_model_magic'\]"),
    ({"parallel_drafting": True}, "cannot be used with method 'hivis'"),
    ({"model": "/nonexistent/drafter"}, "does not exist"),
    ({"attention_backend": "FLASH_ATTN"}, "runs its own attention backend"),
    ({"kv_cache_dtype": "fp8"}, r"kv_cache_dtype 'fp8' is not supported for a hivis drafter"),
])
def test_bad_configs(drafter_dir, patch, match):
    cfg = {k: v for k, v in ok(drafter_dir, **patch).items() if v is not None}
    with pytest.raises(HiViSConfigError, match=match):
        check_user_dict(cfg)


def test_not_a_hivis_drafter(tmp_path, drafter_dir):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    with pytest.raises(HiViSConfigError, match="is not a hivis drafter"):
        check_user_dict(ok(str(tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HiViSConfigError, match="has no config.json"):
        check_user_dict(ok(str(empty)))


def test_format_errors(tmp_path, drafter_dir):
    cfg = json.loads(open(f"{drafter_dir}/config.json").read())
    bad = dict(cfg, hivis={**cfg["hivis"], "version": 99})
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="version 99 is not supported"):
        read_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        read_spec(tmp_path)
    for key, value in (("sliding_window", 4096), ("attn_logit_softcapping", 50.0)):
        (tmp_path / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
        with pytest.raises(ValueError, match=rf"sets \['{key}'\]; the hivis drafter's attention is full causal"):
            read_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, sliding_window=None)))  # null: fine
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        read_spec(tmp_path)
    # a hand-made config copied from an M-RoPE target (Qwen2.5-VL): refused here, not in a worker
    mrope = dict(cfg, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]})
    (tmp_path / "config.json").write_text(json.dumps(mrope))
    with pytest.raises(ValueError, match=r"rope_parameters has M-RoPE keys \['mrope_section'\].*1-D"):
        read_spec(tmp_path)


def fake_target(multimodal=True, hidden=64, vocab=100, mrope=False):
    return types.SimpleNamespace(model="fake-target", is_multimodal_model=multimodal, uses_mrope=mrope,
                                 get_hidden_size=lambda: hidden, get_vocab_size=lambda: vocab)


def fake_parallel(**kw):
    return types.SimpleNamespace(**{"data_parallel_size": 1, "decode_context_parallel_size": 1,
                                    "prefill_context_parallel_size": 1, **kw})


def test_target_compatibility(drafter_dir, monkeypatch):
    sc = ok(drafter_dir)
    spec = check_user_dict(sc)
    check_against_target(spec, sc, fake_target(), fake_parallel())
    with pytest.raises(HiViSConfigError, match="is not a multimodal model"):
        check_against_target(spec, sc, fake_target(multimodal=False))
    check_against_target(spec, sc, fake_target(mrope=True), fake_parallel())  # Qwen2.5-VL: on the V1 runner
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(HiViSConfigError, match="uses M-RoPE .* V1 runner only"):
        check_against_target(spec, sc, fake_target(mrope=True))
    with pytest.raises(HiViSConfigError, match="hidden size 64 but target 'fake-target' has 4096"):
        check_against_target(spec, sc, fake_target(hidden=4096))
    with pytest.raises(HiViSConfigError, match="vocab size 100 but target 'fake-target' has 32064"):
        check_against_target(spec, sc, fake_target(vocab=32064))
    with pytest.raises(HiViSConfigError, match="data parallelism yet"):
        check_against_target(spec, sc, fake_target(), fake_parallel(data_parallel_size=2))
    with pytest.raises(HiViSConfigError, match="decode context parallelism"):
        check_against_target(spec, sc, fake_target(), fake_parallel(decode_context_parallel_size=2))
    # the engine's --kv-cache-dtype reaches the drafter's cache unless the speculative config sets its own
    with pytest.raises(HiViSConfigError, match="--kv-cache-dtype fp8_e4m3 would give the hivis drafter an fp8"):
        check_against_target(spec, sc, fake_target(), fake_parallel(), engine_kv_cache_dtype="fp8_e4m3")
    check_against_target(spec, dict(sc, kv_cache_dtype="auto"), fake_target(), fake_parallel(),
                         engine_kv_cache_dtype="fp8_e4m3")
    check_against_target(spec, sc, fake_target(), fake_parallel(), engine_kv_cache_dtype="auto")


def test_drafter_roundtrip(drafter_dir):
    d = HiViSDrafter.from_pretrained(drafter_dir)
    torch.manual_seed(0)
    e, f = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    pos = torch.arange(5)[None]
    out = d(e, f, pos)
    assert out.shape == (1, 5, 64)
    # causal: the first rows do not depend on later rows
    f2 = f.clone()
    f2[:, 3:] += 1.0
    assert torch.allclose(d(e, f2, pos)[:, :3], out[:, :3])
    # the step bias shifts drafted rows only
    with torch.no_grad():
        d.step_bias.fill_(0.5)
    assert torch.allclose(d(e, f, pos, steps=0), out)
    assert not torch.allclose(d(e, f, pos, steps=1), out)
