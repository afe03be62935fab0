"""Drafters in plain torch: the hivis drafter (training-side twin of ``vllm_hivis.serving.drafter``)
and the one interface every trainable drafter kind offers to training and evaluation.

``HiViSDrafter``: same parameters, same checkpoint keys, same computation as the vLLM model (see
serving/drafter.py for the formula): [a multi-layer drafter first combines the target's layers
into f, `combine_features`], fc(2H -> H, no bias) over [Emb(x_{t+1}); f_in], one
transformers ``LlamaDecoderLayer`` without input norm, RoPE at drafter (compressed) positions, the
target's LM head on the output. A parity test holds this module and the vLLM model to the same logits.

The drafter interface (``HiViSDrafter`` for the kinds hivis / text / eagle, ``ViSpecDrafter`` in
baselines.py for vispec), so that the loss and the offline evaluator have no per-kind branches:

    kind                   which rows and positions it reads (train/examples.py)
    example(rec)           a record -> the model's training/drafting example
    inputs(batch, embed)   (input embeddings [B, N, H], fuse): ``fuse(features)`` gives the feature
                           input of every row (ViSpec fuses a global image vector into it)
    core                   the HiViSDrafter whose forward() runs the decoder layer
    export(dir, ...)       write it in the format that serves it (hivis format, vLLM EAGLE, bundle)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..method.checkpoint import DrafterSpec, llama_config_dict, read_config, read_spec, tokenizer_fingerprint


class HiViSDrafter(nn.Module):
    def __init__(self, config, spec: DrafterSpec):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        super().__init__()
        config._attn_implementation = "sdpa"
        self.config, self.spec = config, spec
        H = config.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=False)
        layer = LlamaDecoderLayer(config, layer_idx=0)
        layer.input_layernorm = nn.Identity()
        self.layers = nn.ModuleList([layer])
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.step_bias = nn.Parameter(torch.zeros(spec.step_bias_steps, H)) if spec.step_bias_steps else None
        n = spec.num_feature_layers
        self.feature_fc = nn.Linear(n * H, H, bias=False) if spec.feature_layers else None
        self.kind = "hivis" if spec.uses_target_features else "text"  # "eagle" for vLLM's EAGLE-format heads

    # -- the drafter interface (module docstring) ---------------------------------------------
    @property
    def core(self) -> HiViSDrafter:
        return self

    def example(self, rec: dict) -> dict:
        from .examples import make_example

        return make_example(rec, self.kind, feature_layers=self.spec.feature_layers,
                            num_target_layers=self.spec.num_target_layers)

    def combine_features(
        self,
        features: torch.Tensor,  # [..., n*H] the target's layers at a row (spec order), or [..., H] last layer
    ) -> torch.Tensor:  # [..., H] the feature f of verified rows (checkpoint.py's formula)
        """Multi-layer drafters: f = feature_fc([rms(a_1); ...; final]); otherwise the identity.
        Applied to the target's features only (draft steps feed back the drafter's own f̂)."""
        if self.feature_fc is None:
            return features
        layers, H = self.spec.feature_layers, self.config.hidden_size
        assert features.shape[-1] == len(layers) * H, (features.shape, layers)
        blocks = features.unflatten(-1, (len(layers), H))
        inter = len(self.spec.intermediate_layers)  # the final layer is last and stays as is
        a = blocks[..., :inter, :].float()
        a = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return self.feature_fc(torch.cat([a.to(blocks.dtype), blocks[..., inter:, :]], dim=-2).flatten(-2))

    def inputs(self, batch: dict, embed: nn.Embedding):
        # batch["input_ids"]: [B, N] -> (embeddings [B, N, H], fuse: features [B, N, H] -> the same)
        return embed(batch["input_ids"].clamp(min=0)), lambda features: features

    def input_features(
        self,
        features: torch.Tensor,  # [..., H] target features (step 0) or fed-back drafter outputs
        steps: torch.Tensor | int,  # [...] or scalar: draft step of each row (0 = verified row)
    ) -> torch.Tensor:
        """f_in = f + b_k for draft step k >= 1 (v2 bias-correction residual), f at step 0."""
        if not self.spec.uses_target_features:
            return torch.zeros_like(features)
        if self.step_bias is None:
            return features
        table = torch.cat([self.step_bias.new_zeros(1, self.step_bias.shape[1]), self.step_bias])
        k = torch.as_tensor(steps, device=features.device).clamp(0, self.step_bias.shape[0])
        return features + table[k].to(features.dtype)

    def forward(
        self,
        embeds: torch.Tensor,  # [B, T, H] target embeddings of the input tokens x_{t+1}
        features: torch.Tensor,  # [B, T, H] input features (before the step bias)
        positions: torch.Tensor,  # [B, T] drafter positions
        steps: torch.Tensor | int = 0,  # [B, T] or scalar draft step per row
        mask: torch.Tensor | None = None,  # [B, 1, T, T_kv] bool, True = may attend; None = causal
        cache=None,  # transformers Cache: earlier keys/values (unrolled training, offline drafting)
    ) -> torch.Tensor:  # [B, T, H] output features (feed to the target LM head for logits)
        assert embeds.shape == features.shape and embeds.shape[:2] == positions.shape
        h = self.fc(torch.cat([embeds, self.input_features(features, steps)], dim=-1))
        pos_emb = self.rotary_emb(h, positions)
        if mask is None:
            T = h.shape[1]
            mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()[None, None].expand(h.shape[0], 1, T, T)
        return self.layers[0](h, attention_mask=mask, position_ids=positions, position_embeddings=pos_emb,
                              past_key_values=cache, use_cache=cache is not None)

    def export(self, out_dir: str | os.PathLike, provenance: dict | None = None, target: str | None = None) -> Path:
        """Write the drafter in the format that serves it; `target`: the target's directory (its
        name and tokenizer fingerprint are recorded, so serving can check the pairing)."""
        if self.kind == "eagle":  # vLLM's built-in "method": "eagle" serves it
            from .baselines import export_eagle

            return export_eagle(self, out_dir, provenance)
        tok = tokenizer_fingerprint(target) if target is not None and Path(target).is_dir() else None
        self.spec = dataclasses.replace(self.spec, target=target, tokenizer=tok)
        return self.save_pretrained(out_dir, provenance=provenance)

    # -- checkpoint I/O (format: method/checkpoint.py) -----------------------------------------
    @classmethod
    def for_target(cls, text_config: dict, spec: DrafterSpec, **kw) -> HiViSDrafter:
        """A freshly initialised drafter sized for a target whose text config (dict) is given."""
        from transformers import LlamaConfig

        return cls(LlamaConfig(**llama_config_dict(text_config, spec, **kw)), spec)

    @classmethod
    def from_pretrained(cls, drafter_dir: str | os.PathLike) -> HiViSDrafter:
        from transformers import LlamaConfig

        spec = read_spec(drafter_dir)
        cfg = read_config(drafter_dir)
        cfg.pop("hivis")
        model = cls(LlamaConfig(**cfg), spec)
        model.load_weights(load_file(str(Path(drafter_dir) / "model.safetensors")), str(drafter_dir))
        return model

    def load_weights(self, sd: dict[str, torch.Tensor], where: str) -> None:
        """Load a checkpoint's tensors (any float dtype); every parameter must be present."""
        missing, unexpected = self.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("inv_freq")]
        if missing or unexpected:
            raise ValueError(f"{where}: weights do not match the drafter (missing {missing}, unexpected {unexpected})")

    def save_pretrained(self, out_dir: str | os.PathLike, dtype=torch.float16, provenance: dict | None = None):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        keep = llama_config_dict(cfg, self.spec)
        keep["head_dim"] = self.config.head_dim
        keep["dtype"] = str(dtype).removeprefix("torch.")
        sd = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()
              if not k.endswith("inv_freq")}
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(keep, indent=2) + "\n")
        if provenance is not None:
            (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        read_spec(out)  # the directory we wrote must load
        return out


def build_drafter(recipe, text_config: dict) -> nn.Module:
    """A freshly initialised drafter of ``recipe.kind`` sized for a target text config (dict)."""
    layers = list(recipe.feature_layers) if recipe.feature_layers else None
    spec = DrafterSpec(hidden_size=text_config["hidden_size"], vocab_size=text_config["vocab_size"],
                       step_bias_steps=max(0, recipe.unroll - 1) if recipe.step_bias and recipe.kind != "text" else 0,
                       uses_target_features=recipe.kind != "text", feature_layers=layers,
                       num_target_layers=text_config["num_hidden_layers"] if layers else None)
    d = HiViSDrafter.for_target(text_config, spec)
    if recipe.kind == "vispec":
        from .baselines import ViSpecDrafter

        return ViSpecDrafter(d, recipe.num_q)
    d.kind = recipe.kind
    return d


def load_drafter(path: str | os.PathLike) -> nn.Module:
    """Any trained drafter directory: the hivis format (hivis, text), vLLM's EAGLE head format, or a
    ViSpec-style bundle. Raises ValueError for anything else."""
    p = Path(path)
    if (p / "vispec.json").is_file():
        from .baselines import ViSpecDrafter

        return ViSpecDrafter.load(str(p)).eval()
    cfg = read_config(p)
    if "hivis" in cfg:
        return HiViSDrafter.from_pretrained(p).eval()
    if cfg.get("architectures") != ["LlamaForCausalLM"] or cfg.get("num_hidden_layers") != 1:
        raise ValueError(f"{p} is neither a hivis drafter, a ViSpec-style bundle nor a 1-layer EAGLE head")
    from transformers import LlamaConfig

    d = HiViSDrafter(LlamaConfig(**cfg), DrafterSpec(hidden_size=cfg["hidden_size"], vocab_size=cfg["vocab_size"]))
    d.load_weights(load_file(str(p / "model.safetensors")), str(p))
    d.kind = "eagle"
    return d.eval()
