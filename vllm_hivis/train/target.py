"""The target VLM in transformers: one wrapper for data generation, the offline evaluator and the
testbed's grading.

``HFTarget(dir)`` loads a local model directory (never downloads: ``local_files_only``) with its
processor and gives the three things the pipeline needs from a target:

- `encode(item)`: the prompt exactly as vLLM tokenises it (chat template, image placeholders
  expanded) plus the processor's pixel values;
- `forward(ids, cache, pixel_values)`: teacher-forced last-layer hidden states after the final
  norm (the tensor vLLM hands the proposer; the parity test holds the two together), the greedy
  next tokens and the projected image features;
- `hidden_states(ids, image)`: the same over a whole recorded sequence (data generation).
"""

from __future__ import annotations

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


def image_size(target_dir: str | os.PathLike) -> int:
    """The side (pixels) of the target's vision tower input."""
    return int(check_target(target_dir)["vision_config"]["image_size"])


class HFTarget:
    def __init__(self, target_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = check_target(target_dir)
        self.hf = AutoModelForImageTextToText.from_pretrained(target_dir, dtype=dtype,
                                                              local_files_only=True).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(target_dir, local_files_only=True)
        self.image_token_id = int(self.hf.config.image_token_index)
        self.eos = self.processor.tokenizer.eos_token_id
        self.device, self.dtype = torch.device(device), dtype

    def pixel_values(self, image) -> torch.Tensor:
        """[1, 3, S, S] processor pixels of one image, on the target's device and dtype."""
        img = self.processor.image_processor(images=[image], return_tensors="pt")
        return img["pixel_values"].to(self.device, self.dtype)

    def encode(self, item: PromptItem) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt ids [L] with image placeholders expanded, pixel values or None)."""
        text = item.chat_text(self.processor)
        if item.image is None:
            enc = self.processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)
            return enc["input_ids"][0], None
        enc = self.processor(images=item.image, text=text, return_tensors="pt", add_special_tokens=False)
        return enc["input_ids"][0], enc["pixel_values"].to(self.device, self.dtype)

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,  # [T] new tokens (the whole prompt on the first call)
        cache=None,  # transformers Cache holding the earlier tokens, or None
        pixel_values: torch.Tensor | None = None,  # [n_img, 3, S, S] for a prompt with images
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden [T, H] post-norm, greedy next tokens [T], image features [N_img_rows, H] or None)."""
        out = self.hf.model(input_ids=ids[None].to(self.device), past_key_values=cache, use_cache=cache is not None,
                            pixel_values=pixel_values)
        h = out.last_hidden_state[0]
        img = out.image_hidden_states
        return h, self.hf.lm_head(h).argmax(-1), None if img is None else img.reshape(-1, h.shape[-1])

    def hidden_states(self, ids: torch.Tensor, image=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced (hidden [L, H], image features [N, H]) of a recorded sequence, fp32 on the CPU."""
        pixels = None if image is None else self.pixel_values(image)
        h, _, img = self.forward(torch.as_tensor(ids), None, pixels)
        H = h.shape[-1]
        return h.float().cpu(), (img.float().cpu() if img is not None else torch.zeros(0, H))
