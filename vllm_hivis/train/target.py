"""The target VLM in transformers: one wrapper for data generation, the offline evaluator and the
testbed's grading.

``HFTarget(dir)`` loads a local model directory (never downloads: ``local_files_only``) with its
processor and gives the three things the pipeline needs from a target:

- `encode(item)`: the prompt exactly as vLLM tokenises it (chat template, image placeholders
  expanded) plus the processor's image inputs (`MM_KEYS`: pixel values, and the per-image sizes
  or grids of any-resolution targets);
- `forward(ids, cache, mm, layers)`: teacher-forced last-layer hidden states after the final norm
  (the tensor vLLM hands the proposer; the parity tests hold the two together), the greedy next
  tokens, the projected image features (where the model returns them) and, when asked, the
  states at other layers (`layer_states`);
- `hidden_states(ids, image, layers)`: the same over a whole recorded sequence (data generation).

Layer indices follow ``output_hidden_states`` (and vLLM's auxiliary hidden-state ids): index i in
1..L-1 is the residual stream after i decoder layers; index L is the final state after the norm
(the same tensor as the last-layer hidden state).

Targets: LLaVA-1.5, LLaVA-NeXT (``image_sizes``) and Qwen2.5-VL (``image_grid_thw``; its M-RoPE
positions are transformers' own, computed from the prompt and the grids).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch

from .data import DataError
from .prompts import PromptItem


def check_target(target_dir: str | os.PathLike) -> dict:
    """The target must be a local vision-language model directory; returns its config.json."""
    p = Path(target_dir) / "config.json"
    if not p.is_file():
        raise DataError(f"target {str(target_dir)!r} is not a model directory (no config.json)")
    cfg = json.loads(p.read_text())
    if "vision_config" not in cfg or "text_config" not in cfg:
        raise DataError(f"target {str(target_dir)!r} is not a vision-language model (config.json has no "
                        "vision_config/text_config); hivis drafters are made for VLMs such as LLaVA")
    return cfg


# processor outputs the model's forward takes; mm_token_type_ids (1 at image placeholders) is how
# transformers' Qwen2.5-VL finds the images to compute its M-RoPE positions
MM_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids")
ANY_SIZE = 224  # tiny-world image side for towers that take any size (Qwen2.5-VL: no image_size)


def image_size(target_dir: str | os.PathLike) -> int:
    """The side (pixels) of tiny-world scenes for this target: its vision tower's input size; for
    towers that take any size (Qwen2.5-VL), the side it was trained on (`image_size` in its
    provenance.json, written by hivis_testbed.tinyworld.variants), else ANY_SIZE."""
    cfg = check_target(target_dir)
    if "image_size" in cfg["vision_config"]:
        return int(cfg["vision_config"]["image_size"])
    prov = Path(target_dir) / "provenance.json"
    return int(json.loads(prov.read_text()).get("image_size", ANY_SIZE)) if prov.is_file() else ANY_SIZE


def image_token_id(cfg: dict) -> int:
    """The image placeholder id of a target config (LLaVA: image_token_index; Qwen2.5-VL: image_token_id)."""
    for key in ("image_token_index", "image_token_id"):
        if key in cfg:
            return int(cfg[key])
    raise DataError("the target's config.json names no image placeholder token (image_token_index / image_token_id)")


class HFTarget:
    def __init__(self, target_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = check_target(target_dir)
        self.hf = AutoModelForImageTextToText.from_pretrained(target_dir, dtype=dtype,
                                                              local_files_only=True).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(target_dir, local_files_only=True)
        self.image_token_id = image_token_id(self.config)
        self._typed = "mm_token_type_ids" in inspect.signature(self.hf.model.forward).parameters
        self.eos = self.processor.tokenizer.eos_token_id
        self.device, self.dtype = torch.device(device), dtype

    def _mm(self, enc) -> dict[str, torch.Tensor]:
        """The image inputs of a processor output, on the target's device (pixels in its dtype)."""
        return {k: enc[k].to(self.device, self.dtype) if enc[k].is_floating_point() else enc[k].to(self.device)
                for k in MM_KEYS if k in enc}

    def mm_inputs(self, image) -> dict[str, torch.Tensor]:
        """The image processor's inputs for one image (pixel_values [1, 3, S, S] for LLaVA-1.5)."""
        return self._mm(self.processor.image_processor(images=[image], return_tensors="pt"))

    def encode(self, item: PromptItem) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(prompt ids [L] with image placeholders expanded, image inputs or None)."""
        text = item.chat_text(self.processor)
        if item.image is None:
            enc = self.processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)
            return enc["input_ids"][0], None
        enc = self.processor(images=item.image, text=text, return_tensors="pt", add_special_tokens=False)
        return enc["input_ids"][0], self._mm(enc)

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,  # [T] new tokens (the whole prompt on the first call)
        cache=None,  # transformers Cache holding the earlier tokens, or None
        mm: dict[str, torch.Tensor] | None = None,  # encode()'s image inputs, with the prompt only
        layers: tuple[int, ...] = (),  # layer indices (module docstring) to return in `layer_states`
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden [T, H] post-norm, greedy next tokens [T], image features [N_img_rows, H] or None);
        with `layers`, the states [T, len(layers), H] at those layers are left in `self.layer_states`."""
        out = self.hf.model(input_ids=ids[None].to(self.device), past_key_values=cache, use_cache=cache is not None,
                            output_hidden_states=bool(layers), **(mm or {}))
        h = out.last_hidden_state[0]
        if layers:
            n = len(out.hidden_states) - 1  # decoder layers
            bad = [i for i in layers if not 1 <= i <= n]
            if bad:
                raise DataError(f"feature layers {bad} are out of range for this target: it has {n} decoder layers "
                                f"(valid: 1..{n}, where {n} is the final state after the norm)")
            self.layer_states = torch.stack([out.hidden_states[i][0] for i in layers], dim=1)
        img = getattr(out, "image_hidden_states", None)
        return h, self.hf.lm_head(h).argmax(-1), None if img is None else img.reshape(-1, h.shape[-1])

    def num_layers(self) -> int:
        return int(self.config["text_config"]["num_hidden_layers"])

    def hidden_states(self, ids: torch.Tensor, image=None, layers: tuple[int, ...] = ()):
        """Teacher-forced (hidden [L, H], image features [N, H], layer states [L, len(layers), H] or
        None) of a recorded sequence, fp32 on the CPU."""
        ids = torch.as_tensor(ids)
        mm = None if image is None else self.mm_inputs(image)
        if mm is not None and self._typed:  # sequence-aligned placeholder marks (see MM_KEYS)
            mm["mm_token_type_ids"] = (ids == self.image_token_id).long()[None].to(self.device)
        h, _, img = self.forward(ids, None, mm, layers)
        H = h.shape[-1]
        return (h.float().cpu(), (img.float().cpu() if img is not None else torch.zeros(0, H)),
                self.layer_states.float().cpu() if layers else None)
