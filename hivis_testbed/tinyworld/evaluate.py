"""Grade a tiny-world target: per-attribute accuracy of its descriptions, QA accuracy, and how
much its answers depend on the image (blank-image control). Greedy decoding with transformers.

    hivis-testbed eval-target MODEL_DIR --n 200 --out metrics.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from .batches import pixels, prompt_ids
from .dataset import sample
from .prompts import ATTRIBUTES, KINDS, grade_description
from .scenes import blank_image

QA_KINDS = tuple(k for k in KINDS if k != "describe")


@torch.no_grad()
def greedy(model, tokenizer, questions: list[str], images, max_new_tokens: int = 96) -> list[str]:
    """Batched greedy decoding (left padding) of one image + question per row; returns answers."""
    n_img = model.config.image_seq_length
    rows = [prompt_ids(tokenizer, q, n_img) for q in questions]
    T = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    att = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(input_ids=ids, attention_mask=att, pixel_values=pixels(images),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(o[T:], skip_special_tokens=True).strip() for o in out]


def evaluate(model_dir: str, n: int = 200, split: str = "test", batch_size: int = 25) -> dict:
    from transformers import AutoTokenizer

    from vllm_hivis.train.target import HFTarget

    model = HFTarget(model_dir).hf
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    size = model.config.vision_config.image_size
    acc: dict[str, list[bool]] = defaultdict(list)
    blank_acc: dict[str, list[bool]] = defaultdict(list)
    exact, same_as_blank, distinct = [], [], set()
    for lo in tqdm(range(0, n, batch_size), desc="describe"):
        ss = [sample(split, i, size, kind="describe") for i in range(lo, min(n, lo + batch_size))]
        qs = [s.qa.question for s in ss]
        real = greedy(model, tok, qs, [s.image for s in ss])
        blank = greedy(model, tok, qs, [blank_image(size)] * len(ss))
        for s, r, b in zip(ss, real, blank):
            for k, v in grade_description(s.scene, r).items():
                acc[k] += v
            for k, v in grade_description(s.scene, b).items():
                blank_acc[k] += v
            exact.append(r == s.qa.answer)
            same_as_blank.append(r == b)
            distinct.add(r)
    qa: dict[str, list[bool]] = defaultdict(list)
    for lo in tqdm(range(0, n, batch_size), desc="qa"):
        ss = [sample(split, 100_000 + i, size, kind=QA_KINDS[i % len(QA_KINDS)])
              for i in range(lo, min(n, lo + batch_size))]
        for s, a in zip(ss, greedy(model, tok, [s.qa.question for s in ss], [s.image for s in ss])):
            qa[s.qa.kind].append(a == s.qa.answer)
    mean = lambda v: round(sum(v) / max(1, len(v)), 4)  # noqa: E731
    return {
        "split": split, "n_describe": n,
        "describe_accuracy": {k: mean(acc[k]) for k in ATTRIBUTES},
        "describe_accuracy_blank_image": {k: mean(blank_acc[k]) for k in ATTRIBUTES},
        "describe_exact_match": mean(exact),
        "describe_same_as_blank": mean(same_as_blank),
        "describe_distinct_outputs": len(distinct),
        "qa_exact_match": {k: mean(v) for k, v in sorted(qa.items())},
        "image_tokens": model.config.image_seq_length,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", help="write the metrics JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    m = evaluate(args.model_dir, args.n, args.split)
    text = json.dumps(m, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
