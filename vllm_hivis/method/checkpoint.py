"""The hivis drafter checkpoint format: an HF-style directory vLLM and plain torch both load.

    <drafter dir>/config.json        a 1-layer Llama config + "architectures": ["HiViSDrafterForCausalLM"]
                                     + a "hivis" block (DrafterSpec below)
    <drafter dir>/model.safetensors  fc.weight, layers.0.*, [step_bias], [feature_fc.weight]; never embed_tokens or
                                     lm_head: both are shared from the target at load time
    <drafter dir>/provenance.json    optional: how it was made (command, seed, commit, metrics)

This module imports neither vLLM nor transformers, so config validation stays cheap (the weights
are checked from the safetensors header alone: names, shapes, dtypes; no tensor is read).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path

ARCHITECTURE = "HiViSDrafterForCausalLM"
FORMAT_VERSION = 1
# Which target rows the drafter sees. "input-token": drop target row p iff token p+1 is an image
# placeholder, so every *input token* the drafter reads is a text token (see hide.py).
DROP_RULES = ("input-token",)


def intermediate_layers(layers, num_target_layers: int) -> tuple[int, ...]:
    """The layers of `layers` before the final one (index num_target_layers, the normed state that
    every dataset records as its hidden state): what multi-layer data must record besides it, and
    what vLLM hands over before the norm."""
    return tuple(i for i in layers or () if i < num_target_layers)


class DrafterFormatError(ValueError):
    """A directory that is not a loadable hivis drafter (message says what and what is expected)."""


@dataclasses.dataclass(frozen=True)
class DrafterSpec:
    """The ``hivis`` block of a drafter's config.json."""

    hidden_size: int  # must equal the target LM's hidden size (fc: 2H -> H)
    vocab_size: int  # must equal the target's vocabulary (embedding / LM head are shared)
    drop_rule: str = "input-token"
    step_bias_steps: int = 0  # v2 step-dependent bias-correction residuals (0 = off)
    uses_target_features: bool = True  # False: a text-only drafter (the feature input is zero)
    version: int = FORMAT_VERSION
    target: str | None = None  # free text: which target it was trained for
    tokenizer: str | None = None  # tokenizer_fingerprint of that target (None: not recorded)
    # Multi-layer target features (EAGLE-3-style, at text positions only). None: the last layer
    # alone (f = the final normed state). Else sorted target layer indices, as vLLM's auxiliary
    # hidden-state ids: i < n_layers is the residual stream after i decoder layers, n_layers the
    # final state after the target's norm. The feature is then
    #     f = feature_fc([rms(a_i1); ...; rms(a_in)])    (n*H -> H, no bias)
    # with rms(x) = x / sqrt(mean(x^2) + eps) for intermediate layers (their scale grows with depth)
    # and the final layer taken as the target's normed state itself.
    feature_layers: list[int] | None = None
    num_target_layers: int | None = None  # the target's decoder layers (set with feature_layers)

    def __post_init__(self):
        if self.feature_layers is not None:  # JSON lists and tuples compare alike
            object.__setattr__(self, "feature_layers", [int(i) for i in self.feature_layers])

    @property
    def num_feature_layers(self) -> int:
        return len(self.feature_layers) if self.feature_layers else 1

    @property
    def intermediate_layers(self) -> tuple[int, ...]:
        """The fused layers other than the final one (sorted first); () without feature_layers."""
        return intermediate_layers(self.feature_layers, self.num_target_layers or 0)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def check_feature_layers(spec: DrafterSpec, where: str) -> None:
    """The feature_layers contract (DrafterSpec); raises DrafterFormatError."""
    layers, n = spec.feature_layers, spec.num_target_layers
    if layers is None:
        if n is not None:
            raise DrafterFormatError(f"{where}: num_target_layers is set without feature_layers")
        return
    if not isinstance(n, int) or n < 2:
        raise DrafterFormatError(f"{where}: feature_layers needs num_target_layers (the target's decoder layers, "
                                 f">= 2), got {n!r}")
    if not layers or layers != sorted(set(layers)) or not all(1 <= i <= n for i in layers):
        raise DrafterFormatError(f"{where}: feature_layers must be a non-empty, sorted list of distinct target layer "
                                 f"indices in 1..{n} ({n} = the final normed state), got {layers}")
    if not spec.uses_target_features:
        raise DrafterFormatError(f"{where}: a text-only drafter (uses_target_features=false) reads no feature layers")


def read_config(drafter_dir: str | os.PathLike) -> dict:
    d = Path(drafter_dir)
    if not d.is_dir():
        raise DrafterFormatError(f"hivis drafter directory {str(d)!r} does not exist "
                                 "(expected a directory made by `vllm-hivis train` or vllm_hivis.method.checkpoint)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise DrafterFormatError(f"{str(d)!r} has no config.json; a hivis drafter directory holds "
                                 "config.json (with a 'hivis' block) and model.safetensors")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise DrafterFormatError(f"{cfg_path} is not valid JSON: {e}") from None


def read_spec(drafter_dir: str | os.PathLike) -> DrafterSpec:
    """Parse and validate a drafter directory's format (not its compatibility with a target)."""
    cfg = read_config(drafter_dir)
    arch = cfg.get("architectures") or []
    block = cfg.get("hivis")
    if ARCHITECTURE not in arch or not isinstance(block, dict):
        raise DrafterFormatError(
            f"{str(drafter_dir)!r} is not a hivis drafter: config.json has architectures={arch} and "
            f"{'a' if isinstance(block, dict) else 'no'} 'hivis' block; expected "
            f"architectures=['{ARCHITECTURE}'] and a 'hivis' block (use method 'eagle' for EAGLE heads)")
    known = {f.name for f in dataclasses.fields(DrafterSpec)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise DrafterFormatError(f"{drafter_dir}: unknown keys {unknown} in the 'hivis' block; known: {sorted(known)}")
    spec = DrafterSpec(**block)
    if spec.version != FORMAT_VERSION:
        raise DrafterFormatError(f"{drafter_dir}: hivis format version {spec.version} is not supported "
                                 f"(this vllm-hivis reads version {FORMAT_VERSION})")
    check_feature_layers(spec, str(drafter_dir))
    aux = cfg.get("eagle_aux_hidden_state_layer_ids")
    if aux != spec.feature_layers and not (aux is None and spec.feature_layers is None):
        raise DrafterFormatError(f"{drafter_dir}: config.json eagle_aux_hidden_state_layer_ids={aux} (the layers "
                                 f"vLLM hands the drafter) disagrees with the 'hivis' block's feature_layers="
                                 f"{spec.feature_layers}; they must be equal")
    if spec.drop_rule not in DROP_RULES:
        raise DrafterFormatError(f"{drafter_dir}: drop_rule {spec.drop_rule!r} unknown; expected one of {DROP_RULES}")
    if cfg.get("hidden_size") != spec.hidden_size or cfg.get("vocab_size") != spec.vocab_size:
        raise DrafterFormatError(f"{drafter_dir}: config.json hidden_size/vocab_size "
                                 f"({cfg.get('hidden_size')}/{cfg.get('vocab_size')}) disagree with its 'hivis' "
                                 f"block ({spec.hidden_size}/{spec.vocab_size})")
    if cfg.get("num_hidden_layers") != 1:
        raise DrafterFormatError(f"{drafter_dir}: a hivis drafter has exactly 1 decoder layer, "
                                 f"config.json says num_hidden_layers={cfg.get('num_hidden_layers')}")
    unsupported = sorted(k for k in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "alibi")
                         if cfg.get(k))
    if unsupported:
        raise DrafterFormatError(f"{drafter_dir}: config.json sets {unsupported}; the hivis drafter's attention is "
                                 "full causal attention without a sliding window, soft cap or ALiBi: remove them")
    for rope in ("rope_parameters", "rope_scaling"):
        mrope = sorted(k for k in (cfg.get(rope) or {}) if k.startswith("mrope"))
        if mrope:
            raise DrafterFormatError(f"{drafter_dir}: config.json {rope} has M-RoPE keys {mrope}; a hivis drafter's "
                                     "text-only sequence is 1-D (positions 0..N-1), so its RoPE is plain: remove them "
                                     "(the target may use M-RoPE; `vllm-hivis train` writes 1-D drafter configs)")
    weights = Path(drafter_dir) / "model.safetensors"
    if not weights.is_file():
        pickles = sorted(p.name for p in Path(drafter_dir).glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        hint = (f" (found pickle weights {pickles}: they are never loaded, since unpickling runs code; convert "
                "them with safetensors.torch.save_file)") if pickles else ""
        raise DrafterFormatError(f"{drafter_dir}: model.safetensors is missing (weights are read from safetensors "
                                 f"only){hint}")
    check_weights(weights, expected_tensors(cfg, spec))
    return spec


def expected_tensors(cfg: dict, spec: DrafterSpec) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of a drafter checkpoint with this config.json."""
    H, inter = spec.hidden_size, cfg.get("intermediate_size")
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    if not (isinstance(heads, int) and heads > 0 and isinstance(inter, int) and inter > 0):
        raise DrafterFormatError("config.json needs positive integer num_attention_heads and intermediate_size")
    hd = cfg.get("head_dim") or H // heads
    out = {"fc.weight": (H, 2 * H), "layers.0.post_attention_layernorm.weight": (H,),
           "layers.0.self_attn.q_proj.weight": (heads * hd, H), "layers.0.self_attn.k_proj.weight": (kv * hd, H),
           "layers.0.self_attn.v_proj.weight": (kv * hd, H), "layers.0.self_attn.o_proj.weight": (H, heads * hd),
           "layers.0.mlp.gate_proj.weight": (inter, H), "layers.0.mlp.up_proj.weight": (inter, H),
           "layers.0.mlp.down_proj.weight": (H, inter)}
    if spec.step_bias_steps:
        out["step_bias"] = (spec.step_bias_steps, H)
    if spec.feature_layers:
        out["feature_fc.weight"] = (H, spec.num_feature_layers * H)
    return out


def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (name -> {dtype, shape, data_offsets}), without
    reading any tensor. Raises DrafterFormatError for anything that is not a safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 * 2**20):
            raise DrafterFormatError(f"{path} is not a safetensors file (corrupt or truncated header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DrafterFormatError(f"{path} is not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise DrafterFormatError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}")
    return header


def check_weights(path: str | os.PathLike, expected: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint holds exactly the expected tensors, with those shapes, in a float dtype."""
    header = safetensors_header(path)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        shared = [k for k in extra if k.startswith(("embed_tokens", "lm_head", "model.embed_tokens"))]
        note = (" (embed_tokens / lm_head are shared from the target and must not be in the checkpoint)"
                if shared else "")
        raise DrafterFormatError(f"{path}: the weights do not match config.json: missing {missing}, unexpected "
                                 f"{extra}{note}")
    for name, shape in expected.items():
        got = tuple(header[name]["shape"])
        if got != shape:
            raise DrafterFormatError(f"{path}: tensor {name} has shape {list(got)}, config.json implies {list(shape)}")
        if header[name]["dtype"] not in ("F16", "BF16", "F32"):
            raise DrafterFormatError(f"{path}: tensor {name} is {header[name]['dtype']}; expected F16, BF16 or F32")


def tokenizer_fingerprint(model_dir: str | os.PathLike) -> str | None:
    """Hash of a model directory's tokenizer files (None: the directory has none): data, drafter
    and target must agree on it."""
    h, found = hashlib.sha256(), False
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        p = Path(model_dir) / name
        if p.is_file():
            h.update(p.read_bytes())
            found = True
    return h.hexdigest()[:16] if found else None


def llama_config_dict(text_config: dict, spec: DrafterSpec, intermediate_size: int | None = None,
                      num_heads: int | None = None) -> dict:
    """config.json for a drafter of a target whose text config (a dict) is `text_config`."""
    keep = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
            "rms_norm_eps", "max_position_embeddings", "rope_parameters", "rope_theta", "hidden_act",
            "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias")
    cfg = {k: text_config[k] for k in keep if k in text_config}
    for rope in ("rope_parameters", "rope_scaling"):  # the drafter's text-only sequence is 1-D: no M-RoPE
        if isinstance(cfg.get(rope), dict):
            cfg[rope] = {k: v for k, v in cfg[rope].items() if not k.startswith("mrope")}
    if intermediate_size:
        cfg["intermediate_size"] = intermediate_size
    if num_heads:
        cfg["num_attention_heads"] = cfg["num_key_value_heads"] = num_heads
        cfg["head_dim"] = cfg["hidden_size"] // num_heads
    cfg.update(model_type="llama", architectures=[ARCHITECTURE], num_hidden_layers=1,
               tie_word_embeddings=False, hivis=spec.to_json())
    if spec.feature_layers:  # vLLM's own key: its runners read it to collect these target layers
        cfg["eagle_aux_hidden_state_layer_ids"] = list(spec.feature_layers)
    return cfg
