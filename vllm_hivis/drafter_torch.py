"""The hivis drafter in plain torch: the training-side twin of ``vllm_hivis.drafter``.

Same parameters, same checkpoint keys, same computation (see drafter.py for the formula):
fc(2H -> H, no bias) over [Emb(x_{t+1}); f_in], one transformers ``LlamaDecoderLayer`` without
input norm, RoPE at drafter (compressed) positions, the target's LM head on the output.
A parity test holds this module and the vLLM model to the same logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .checkpoint import DrafterSpec, llama_config_dict, read_config, read_spec


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

    # -- checkpoint I/O (format: checkpoint.py) ------------------------------------------------
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
        sd = load_file(str(Path(drafter_dir) / "model.safetensors"))
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("inv_freq")]
        if missing or unexpected:
            raise ValueError(f"{drafter_dir}: weights do not match the drafter (missing {missing}, "
                             f"unexpected {unexpected})")
        return model

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
