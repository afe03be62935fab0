"""The startup config table: malformed or inconsistent hivis configs and drafter checkpoints, each
refused when vLLM builds the engine config (``EngineArgs.create_engine_config``, before any engine
process starts) with a message that says what was wrong and what is expected. No case may start a
silently degraded server. (An unsupported vLLM release: test_patches.py, in a fresh process.)"""

import json
import shutil

import pytest
import torch

from hivis_testbed import assets
from vllm_hivis.serving.config import HiViSConfigError


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Broken variants of the shipped drafter, and two targets it does not fit."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_hivis.method.checkpoint import DrafterSpec
    from vllm_hivis.train.drafters import HiViSDrafter

    root = tmp_path_factory.mktemp("config-table")
    good = assets.tiny_drafter()

    def variant(name, cfg_edit=None, weights_edit=None, files=None):
        d = root / name
        shutil.copytree(good, d)
        if cfg_edit is not None:
            cfg = json.loads((d / "config.json").read_text())
            cfg_edit(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        if weights_edit is not None:
            sd = load_file(str(d / "model.safetensors"))
            weights_edit(sd)
            save_file(sd, str(d / "model.safetensors"))
        for fname, content in (files or {}).items():
            if content is None:
                (d / fname).unlink()
            else:
                (d / fname).write_bytes(content)
        return str(d)

    out = {"good": good, "missing": str(root / "nowhere")}
    (root / "empty").mkdir()
    out["empty"] = str(root / "empty")
    out["bad_json"] = variant("bad_json", files={"config.json": b"{not json"})
    out["eagle_arch"] = variant("eagle_arch", lambda c: (c.update(architectures=["LlamaForCausalLM"]), c.pop("hivis")))
    out["unknown_block_key"] = variant("unknown_block_key", lambda c: c["hivis"].update(magic=1))
    out["version"] = variant("version", lambda c: c["hivis"].update(version=99))
    out["drop_rule"] = variant("drop_rule", lambda c: c["hivis"].update(drop_rule="position"))
    out["two_layers"] = variant("two_layers", lambda c: c.update(num_hidden_layers=2))
    out["pickle_only"] = variant("pickle_only", files={"model.safetensors": None, "pytorch_model.bin": b"\x80\x04"})
    out["corrupt"] = variant("corrupt", files={"model.safetensors": b"\x00" * 64})
    with open(f"{good}/model.safetensors", "rb") as f:
        out["truncated"] = variant("truncated", files={"model.safetensors": f.read()[:5000]})
    out["missing_tensor"] = variant("missing_tensor", weights_edit=lambda sd: sd.pop("fc.weight"))
    out["wrong_shape"] = variant("wrong_shape", weights_edit=lambda sd: sd.update(step_bias=torch.zeros(5, 192)))
    out["own_lm_head"] = variant("own_lm_head",
                                 weights_edit=lambda sd: sd.update({"lm_head.weight": torch.zeros(463, 192)}))
    out["tokenizer"] = variant("tokenizer", lambda c: c["hivis"].update(tokenizer="0123456789abcdef"))
    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128,
            "vocab_size": 463, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024}
    out["hidden"] = str(HiViSDrafter.for_target(text, DrafterSpec(64, 463)).save_pretrained(root / "hidden"))
    text.update(hidden_size=192, vocab_size=500)
    out["vocab"] = str(HiViSDrafter.for_target(text, DrafterSpec(192, 500)).save_pretrained(root / "vocab"))
    llm = root / "text-only-target"
    LlamaForCausalLM(LlamaConfig(hidden_size=192, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                 vocab_size=463, max_position_embeddings=1024)).save_pretrained(llm)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{assets.tiny_target()}/{f}", llm / f)
    out["text_target"] = str(llm)
    return out


def spec(model, k=3, **kw):
    return {"method": "hivis", "model": model, "num_speculative_tokens": k, **kw}


CASES = [  # (name, target ("tiny" or a key of dirs), speculative config from dirs, message words)
    ("missing drafter directory", "tiny", lambda d: spec(d["missing"]), "does not exist"),
    ("directory without config.json", "tiny", lambda d: spec(d["empty"]), "has no config.json"),
    ("config.json not JSON", "tiny", lambda d: spec(d["bad_json"]), "is not valid JSON"),
    ("an EAGLE head given as a hivis drafter", "tiny", lambda d: spec(d["eagle_arch"]), "use method 'eagle'"),
    ("unknown key in the hivis block", "tiny", lambda d: spec(d["unknown_block_key"]), "unknown keys ['magic']"),
    ("unsupported format version", "tiny", lambda d: spec(d["version"]), "version 99 is not supported"),
    ("unknown drop rule", "tiny", lambda d: spec(d["drop_rule"]), "drop_rule 'position' unknown"),
    ("two decoder layers", "tiny", lambda d: spec(d["two_layers"]), "exactly 1 decoder layer"),
    ("pickle-only weights", "tiny", lambda d: spec(d["pickle_only"]), "pickle weights"),
    ("corrupt weights", "tiny", lambda d: spec(d["corrupt"]), "is not a safetensors file"),
    ("truncated weights", "tiny", lambda d: spec(d["truncated"]), "truncated"),
    ("a tensor missing", "tiny", lambda d: spec(d["missing_tensor"]), "missing ['fc.weight']"),
    ("a tensor of the wrong shape", "tiny", lambda d: spec(d["wrong_shape"]), "step_bias has shape [5, 192]"),
    ("its own LM head", "tiny", lambda d: spec(d["own_lm_head"]), "shared from the target"),
    ("hidden size of another target", "tiny", lambda d: spec(d["hidden"]), "hidden size 64 but target"),
    ("vocabulary of another target", "tiny", lambda d: spec(d["vocab"]), "vocab size 500 but target"),
    ("tokenizer of another target", "tiny", lambda d: spec(d["tokenizer"]), "tokenizer differs"),
    ("a target that is not a VLM", "text_target", lambda d: spec(d["good"]), "is not a multimodal model"),
    ("num_speculative_tokens 0", "tiny", lambda d: spec(d["good"], k=0), "integer in 1..32"),
    ("num_speculative_tokens negative", "tiny", lambda d: spec(d["good"], k=-2), "integer in 1..32"),
    ("num_speculative_tokens huge", "tiny", lambda d: spec(d["good"], k=1000), "integer in 1..32"),
    ("num_speculative_tokens not an integer", "tiny", lambda d: spec(d["good"], k=2.5), "integer in 1..32"),
    ("num_speculative_tokens missing", "tiny", lambda d: {"method": "hivis", "model": d["good"]},
     "needs 'num_speculative_tokens'"),
    ("model missing", "tiny", lambda d: {"method": "hivis", "num_speculative_tokens": 3}, "needs 'model'"),
    ("unknown speculative-config key", "tiny", lambda d: spec(d["good"], speculative_magic=1),
     "unknown key(s) ['speculative_magic']"),
    ("tree parameters (draft trees are not served yet)", "tiny",
     lambda d: spec(d["good"], tree={"depth": 4, "top_k": 4, "total_tokens": 16}), "unknown key(s) ['tree']"),
    ("parallel drafting", "tiny", lambda d: spec(d["good"], parallel_drafting=True), "parallel drafting is not"),
    ("heterogeneous vocabulary", "tiny", lambda d: spec(d["good"], use_heterogeneous_vocab=True),
     "shares the target's vocabulary"),
]


@pytest.mark.parametrize("name,target,make,words", CASES, ids=[c[0] for c in CASES])
def test_bad_config_fails_at_startup(dirs, name, target, make, words):
    from vllm.engine.arg_utils import EngineArgs

    model = assets.tiny_target() if target == "tiny" else dirs[target]
    args = EngineArgs(model=model, speculative_config=make(dirs), max_model_len=512, enforce_eager=True)
    with pytest.raises(HiViSConfigError) as err:
        args.create_engine_config()
    assert words in str(err.value), str(err.value)


def test_the_table_is_big_enough_and_a_good_config_passes(dirs):
    from vllm.engine.arg_utils import EngineArgs

    assert len(CASES) >= 20
    cfg = EngineArgs(model=assets.tiny_target(), speculative_config=spec(dirs["good"]), max_model_len=512,
                     enforce_eager=True).create_engine_config()
    assert cfg.speculative_config.method == "eagle" and cfg.cache_config.enable_prefix_caching is True


def test_a_non_dict_speculative_config_is_refused():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_hivis.serving.config import rewrite_engine_args

    args = EngineArgs(model=assets.tiny_target(), spec_method="hivis")
    args.speculative_config = "hivis"
    with pytest.raises(HiViSConfigError, match="must be a JSON object"):
        rewrite_engine_args(args)
