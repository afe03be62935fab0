"""The benchmark workloads: the same prompts and images for every method.

- ``describe``: held-out tiny-world scenes, "Describe the image in detail." (long, templated,
  predictable answers: acceptance is high).
- ``qa``: held-out tiny-world questions of every short kind (count, colour, where, ...).
- ``photos``: out of the tiny world: scikit-image's bundled sample photographs (no download),
  with general questions. The tiny target answers them in tiny-world language; acceptance is
  lower and methods differ most.
- ``images-N``: N tiny-world images in one prompt (scaling: image tokens per request).
Prompts are the target's chat-template strings (BOS included), as vLLM's ``generate`` takes them.
"""

from __future__ import annotations

from hivis_testbed.tinyworld.build import IMAGE_TOKEN, prompt_text
from hivis_testbed.tinyworld.dataset import sample
from hivis_testbed.tinyworld.prompts import KINDS
from vllm_hivis.train.prompts import chat_text

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "camera",
          "coins", "clock", "horse", "moon"]
PHOTO_QUESTIONS = ["Describe the image in detail.", "What is in the center?", "How many shapes are there?",
                   "What colour is the background?"]
NAMES = ("describe", "qa", "photos")
SEED = 2000  # held-out scenes: the test split from index 2000 (no drafter or target saw them)


def chat(question: str, n_images: int = 1, processor=None) -> str:
    """The chat-template prompt with n image placeholders: the tiny LLaVA-1.5 target's template,
    or with `processor` that target's own (the variants: LLaVA-NeXT, Qwen2.5-VL)."""
    if processor is not None:
        return chat_text(processor, question, n_images)
    head = "<s>" + prompt_text(question, with_image=n_images > 0)
    return head.replace(f"{IMAGE_TOKEN}\n", f"{IMAGE_TOKEN}\n" * n_images, 1) if n_images > 1 else head


def photo(name: str):
    """One of scikit-image's bundled photographs as an RGB PIL image."""
    import numpy as np
    import skimage.data
    from PIL import Image

    a = getattr(skimage.data, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(a.astype(np.uint8)).convert("RGB")


def cases(name: str, n: int, image_size: int) -> list[tuple[str, list]]:
    """n (question, images) pairs of workload `name` (see the module docstring)."""
    if name == "describe":
        return [(s.qa.question, [s.image]) for s in (sample("test", SEED + i, image_size, kind="describe")
                                                     for i in range(n))]
    if name == "qa":
        kinds = [k for k in KINDS if k != "describe"]
        return [(s.qa.question, [s.image]) for s in (sample("test", SEED + 500 + i, image_size,
                                                            kind=kinds[i % len(kinds)]) for i in range(n))]
    if name == "photos":
        return [(PHOTO_QUESTIONS[i % len(PHOTO_QUESTIONS)], [photo(PHOTOS[i % len(PHOTOS)])]) for i in range(n)]
    if name.startswith("images-"):
        m = int(name.removeprefix("images-"))
        return [("Describe the image in detail.", [sample("test", SEED + 1000 + m * i + j, image_size).image
                                                   for j in range(m)]) for i in range(n)]
    raise ValueError(f"unknown workload {name!r}; expected one of {NAMES} or images-N")


def workload(name: str, n: int, image_size: int, processor=None) -> list[dict]:
    """The vLLM prompts of `cases` (`processor`: see `chat`)."""
    return [{"prompt": chat(q, len(imgs), processor),
             "multi_modal_data": {"image": imgs[0] if len(imgs) == 1 else imgs}}
            for q, imgs in cases(name, n, image_size)]
