"""Deterministic tiny-world samples by split and index.

Sample ``(split, i)`` is a pure function of its seed ``[SPLITS[split], i]``: the scene, its
jitter and the question drawn for it. Splits never share a seed, so test scenes are unseen.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from .prompts import KINDS, QA, ask
from .scenes import Scene, render_with_mask, sample_scene

SPLITS = {"train": 0, "validation": 1, "test": 2}
# Kind mix for training and for `--kind mix`: long descriptions dominate (they matter for
# speculative decoding), every QA kind is present.
MIX = {"describe": 0.5, "count": 0.08, "background": 0.06, "colour": 0.09, "where": 0.09,
       "cell": 0.09, "yesno": 0.09}
assert set(MIX) == set(KINDS) and abs(sum(MIX.values()) - 1) < 1e-9


@dataclasses.dataclass(frozen=True)
class Sample:
    split: str
    index: int
    scene: Scene
    image: Image.Image
    qa: QA
    mask: np.ndarray  # [S, S] uint8: 1 + index of the object at each pixel (0 = background)


def sample(split: str, index: int, image_size: int, kind: str = "mix") -> Sample:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    rng = np.random.default_rng([SPLITS[split], index])
    scene = sample_scene(rng)
    image, mask = render_with_mask(scene, image_size, rng)
    if kind == "mix":
        kind = str(rng.choice(list(MIX), p=list(MIX.values())))
    elif kind not in KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; expected 'mix' or one of {KINDS}")
    return Sample(split, index, scene, image, ask(scene, kind, rng), mask)
