"""Baseline drafters trained with the same recipe and budget as hivis.

- text-only: the hivis drafter with ``uses_target_features=False`` (a 1-layer LM over the text
  tokens with the target's embedding and LM head); servable by vLLM through the hivis format.
- EAGLE that sees image tokens: the same architecture over every target row, original positions;
  exported in vLLM's own EAGLE format (``LlamaForCausalLM`` head: fc + 1 layer) so vLLM's
  built-in ``"method": "eagle"`` serves it.
- ViSpec-style (arXiv 2509.15235): a vision adaptor compresses the image (its projected
  embeddings) into ``num_q`` learned-query vectors; the first ``num_q - 1`` stand in the drafter's
  sequence for the image, the last is a global image feature fused into the feature of every
  later row by ``img_fc`` (initialised to pass the feature through). Offline evaluation only:
  serving it would need its own vLLM proposer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .drafters import HiViSDrafter


class ImageAdaptor(nn.Module):
    """num_q learned queries cross-attending over the image embeddings (ViSpec's ImgAdaptor)."""

    def __init__(self, hidden: int, num_q: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_q, hidden) * hidden ** -0.5)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)

    def forward(self, image_embeds: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        # image_embeds: [B, M, H]; pad: [B, M] True = padding  ->  [B, num_q, H]
        q = self.queries[None].expand(image_embeds.shape[0], -1, -1)
        return self.attn(q, image_embeds, image_embeds, key_padding_mask=pad, need_weights=False)[0]


class ViSpecDrafter(nn.Module):
    """The ViSpec-style drafter; implements the drafter interface of drafters.py."""

    kind = "vispec"

    def __init__(self, drafter: HiViSDrafter, num_q: int = 2):
        super().__init__()
        H = drafter.config.hidden_size
        self.drafter, self.num_q = drafter, num_q
        self.adaptor = ImageAdaptor(H, num_q, drafter.config.num_attention_heads)
        self.img_fc = nn.Linear(2 * H, H, bias=False)
        with torch.no_grad():  # start as plain EAGLE: pass f through, ignore g
            self.img_fc.weight.zero_()
            self.img_fc.weight[:, :H] = torch.eye(H)

    @property
    def core(self) -> HiViSDrafter:
        return self.drafter

    def example(self, rec: dict) -> dict:
        from .examples import make_example

        return make_example(rec, "vispec", self.num_q)

    def inputs(self, batch: dict, embed: nn.Embedding):
        """(embeddings [B, N, H] with the adaptor rows in place, fuse: features -> image-fused features)."""
        adapted = self.adapt(batch)
        emb = self.adaptor_embeds(embed(batch["input_ids"].clamp(min=0)), adapted, batch["is_adaptor"])
        return emb, lambda features: self.fuse(features, adapted, batch["after_image"])

    def adapt(self, batch: dict) -> torch.Tensor:
        """[B, num_q, H] adapted image vectors of a collated batch."""
        emb = batch["image_embeds"]
        pad = emb.abs().sum(-1) == 0
        pad[:, 0] = False  # keep attention defined for text-only rows (their vectors are unused)
        return self.adaptor(emb, pad)

    def fuse(self, features: torch.Tensor, adapted: torch.Tensor, after_image: torch.Tensor) -> torch.Tensor:
        # features: [B, N, H]; adapted: [B, num_q, H]; after_image: [B, N] -> fused features
        g = adapted[:, -1:].expand_as(features)
        return torch.where(after_image[..., None], self.img_fc(torch.cat([features, g], -1)), features)

    def adaptor_embeds(self, embeds: torch.Tensor, adapted: torch.Tensor, is_adaptor: torch.Tensor) -> torch.Tensor:
        """Input embeddings with the adaptor rows replaced by the first num_q - 1 adapted vectors."""
        out = embeds.clone()
        for b in range(embeds.shape[0]):
            rows = torch.nonzero(is_adaptor[b]).flatten()
            out[b, rows] = adapted[b, : len(rows)].to(out.dtype)
        return out

    def export(self, out_dir: str, provenance: dict | None = None, target: str | None = None) -> Path:
        """The offline bundle (ViSpec-style drafters are not served): drafter/ + the adaptor."""
        out = Path(out_dir)
        self.drafter.save_pretrained(out / "drafter", dtype=torch.float32)
        extra = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()
                 if not k.startswith("drafter.")}
        save_file(extra, str(out / "vispec.safetensors"))
        (out / "vispec.json").write_text(json.dumps({"kind": "vispec", "num_q": self.num_q, "target": target}) + "\n")
        if provenance is not None:
            (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str) -> ViSpecDrafter:
        cfg = json.loads((Path(path) / "vispec.json").read_text())
        m = cls(HiViSDrafter.from_pretrained(Path(path) / "drafter"), cfg["num_q"])
        m.load_state_dict(load_file(str(Path(path) / "vispec.safetensors")), strict=False)
        return m


def export_eagle(drafter: HiViSDrafter, out_dir: str, provenance: dict | None = None, dtype=torch.float16) -> Path:
    """Write a drafter trained with kind "eagle" in vLLM's EAGLE head format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = drafter.config.to_dict()
    keep = {k: cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                "intermediate_size", "rms_norm_eps", "max_position_embeddings", "rope_parameters",
                                "hidden_act", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
            if k in cfg}
    keep.update(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=1,
                tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."))
    sd = {k: v.detach().to(dtype).contiguous() for k, v in drafter.state_dict().items() if not k.endswith("inv_freq")}
    assert "step_bias" not in sd, "vLLM's EAGLE head has no step-bias residuals"
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(keep, indent=2) + "\n")
    if provenance:
        (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out
