"""Tiny-world samples -> model inputs (token ids, labels, pixels) for training and evaluation.

Pixels are normalised exactly like the shipped ``CLIPImageProcessor`` (a test checks this), but
without its per-call overhead; image placeholders are expanded to ``image_seq_length`` ids.
"""

from __future__ import annotations

import numpy as np
import torch

from .build import IMAGE_TOKEN_ID, prompt_text
from .dataset import Sample

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IGNORE = -100


def pixels(images) -> torch.Tensor:
    """[B, 3, S, S] float32 CLIP-normalised pixels of same-size RGB PIL images."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(((arr - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2).copy())


def prompt_ids(tokenizer, question: str, num_image_tokens: int) -> list[int]:
    """BOS + the chat prompt with the image placeholder expanded to `num_image_tokens` ids."""
    head, tail = prompt_text(question).split("<image>")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [tokenizer.bos_token_id, *enc(head), *[IMAGE_TOKEN_ID] * num_image_tokens, *enc(tail)]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer as generated after 'ASSISTANT:' (leading space), then EOS."""
    return [*tokenizer(" " + answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def collate(tokenizer, samples: list[Sample], num_image_tokens: int):
    """Right-padded training batch: ids/labels/attention [B, T], pixels [B, 3, S, S]."""
    seqs, labels = [], []
    for s in samples:
        p = prompt_ids(tokenizer, s.qa.question, num_image_tokens)
        a = answer_ids(tokenizer, s.qa.answer)
        seqs.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    T = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    lab = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
        att[i, : len(s)] = 1
    return ids, lab, att, pixels([s.image for s in samples])
