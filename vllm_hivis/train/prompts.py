"""Prompt sources for drafter data generation and the offline evaluator: one home for all of them.

A *source* is a small JSON-able dict (it is stored in the dataset manifest, so a resumed run can
check it is continuing the same source):

    {"kind": "jsonl", "path": "/abs/prompts.jsonl"}
        one ``{"image": "<path or null>", "prompt": "<question>", "id": optional}`` per line; a
        relative image path is relative to the file
    {"kind": "tinyworld", "split": "train", "start": 0, "count": 4000, "image_size": 168,
     "prompt_kind": "mix"}
        procedural scenes of the testbed's tiny world (``hivis_testbed.tinyworld``, imported only
        for this kind)

`prompt_source(source, start, stop)` returns the source's items ``[start, stop)`` with their
images loaded and checked; `num_prompts(source)` counts them without loading any image.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .data import DataError


def chat_text(processor, question: str, n_images: int = 1) -> str:
    """The target's chat-template prompt for one user turn: n image placeholders, then the question."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


@dataclasses.dataclass
class PromptItem:
    id: str
    question: str
    image: object | None = None  # PIL image, a path, or None for a text-only prompt
    kind: str = "custom"

    def chat_text(self, processor) -> str:
        """The target's chat-template prompt for this item (one image placeholder if it has an image):
        what vLLM is sent for data generation and what the offline evaluator tokenizes."""
        return chat_text(processor, self.question, int(self.image is not None))


def tinyworld_source(spec: str, image_size: int, prompt_kind: str = "mix") -> dict:
    """``"SPLIT:START:COUNT"`` (the CLI's ``--tinyworld``) -> a tinyworld source dict."""
    try:
        split, start, count = spec.split(":")
        start, count = int(start), int(count)
    except ValueError:
        raise DataError(f"--tinyworld expects SPLIT:START:COUNT (e.g. train:0:4000), got {spec!r}") from None
    from hivis_testbed.tinyworld.dataset import SPLITS
    from hivis_testbed.tinyworld.prompts import KINDS

    if split not in SPLITS or start < 0 or count < 1:
        raise DataError(f"--tinyworld {spec!r}: split must be one of {sorted(SPLITS)}, START >= 0 and COUNT >= 1")
    if prompt_kind not in ("mix", *KINDS):
        raise DataError(f"prompt kind {prompt_kind!r} unknown; expected 'mix' or one of {list(KINDS)}")
    return {"kind": "tinyworld", "split": split, "start": start, "count": count, "image_size": int(image_size),
            "prompt_kind": prompt_kind}


def jsonl_source(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompts file {str(p)!r} does not exist")
    return {"kind": "jsonl", "path": str(p.resolve())}


def jsonl_prompts(path: str | os.PathLike) -> list[PromptItem]:
    """Every prompt of a JSONL prompts file (images stay paths; they are checked to exist)."""
    items = []
    base = Path(path).parent
    for n, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q = row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{n + 1}: expected a JSON object with 'prompt' (and optionally 'image', "
                            f"'id'), got {line[:80]!r}") from None
        img = row.get("image")
        if img is not None:
            img = Path(img) if Path(img).is_absolute() else base / img
            if not img.is_file():
                raise DataError(f"{path}:{n + 1}: image {str(img)!r} not found")
        items.append(PromptItem(id=str(row.get("id", n)), question=q, image=img))
    if not items:
        raise DataError(f"{path} holds no prompts")
    return items


def tinyworld_prompts(split: str, start: int, count: int, image_size: int, kind: str = "mix") -> list[PromptItem]:
    from hivis_testbed.tinyworld.dataset import sample

    out = []
    for i in range(start, start + count):
        s = sample(split, i, image_size, kind=kind)
        out.append(PromptItem(id=f"{split}-{i}", question=s.qa.question, image=s.image, kind=s.qa.kind))
    return out


def num_prompts(source: dict) -> int:
    if source["kind"] == "tinyworld":
        return int(source["count"])
    if source["kind"] == "jsonl":
        return len(jsonl_prompts(source["path"]))
    raise DataError(f"unknown prompt source {source['kind']!r}; expected 'tinyworld' or 'jsonl'")


def prompt_source(source: dict, start: int = 0, stop: int | None = None) -> list[PromptItem]:
    """Prompts [start, stop) of a source; images are loaded (PIL, RGB) and checked."""
    from PIL import Image

    stop = num_prompts(source) if stop is None else stop
    if source["kind"] == "tinyworld":
        items = tinyworld_prompts(source["split"], source["start"] + start, stop - start, source["image_size"],
                                  source.get("prompt_kind", "mix"))
    else:
        items = jsonl_prompts(source["path"])[start:stop]
    for it in items:
        if isinstance(it.image, (str, Path)):
            try:
                with Image.open(it.image) as im:
                    it.image = im.convert("RGB")
            except OSError as e:
                raise DataError(f"prompt {it.id}: cannot read image {str(it.image)!r}: {e}") from None
    return items
