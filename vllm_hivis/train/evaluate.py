"""Offline acceptance evaluator: replay greedy chain speculative decoding in plain torch.

    vllm-hivis evaluate --target DIR --drafter DRAFTER --tinyworld test:0:100 -k 5
    vllm-hivis evaluate --target DIR --drafter DRAFTER --jsonl prompts.jsonl -k 5   # your own prompts

The target (transformers, fp32) and a drafter of any kind (hivis, text-only, EAGLE with image
rows, ViSpec-style) run the same loop as vLLM: prefill samples the first token; then every step
the drafter proposes k tokens from the verified sequence (verified rows carry the target's
features, draft rows the drafter's own), the target verifies them in one forward pass, the
longest prefix matching the target's argmax is accepted plus one bonus token. Counting follows
vLLM's scheduler exactly: one draft per verification step, k draft tokens, accepted tokens =
sampled tokens - 1 (counted before stop truncation). The result is an `Acceptance`, the same
object `vllm_hivis.serving.acceptance` builds from vLLM's counters, so the two compare directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from ..serving.acceptance import Acceptance
from .data import image_spans
from .drafters import load_drafter
from .prompts import PromptItem, jsonl_source, prompt_source, tinyworld_source
from .target import HFTarget, check_target, image_size
from .trainer import frozen_target_parts


def append_row(ex: dict, token: int, feature: torch.Tensor, step: int) -> dict:
    """The example with one more drafting row: input token `token`, feature `feature` [H] (the
    drafter's own output), the next drafter position and draft step `step`. Every other per-row
    field repeats the last row (a draft row is a text row after the prompt), whatever the kind."""
    out = {}
    for key, v in ex.items():
        if key == "image_embeds":
            out[key] = v
            continue
        new = {"input_ids": torch.tensor([token]), "positions": v[-1:] + 1, "features": feature[None].to(v.dtype),
               "steps": torch.tensor([step])}.get(key, v[-1:])
        out[key] = torch.cat([v, new.to(v.dtype)])
    return out


@torch.no_grad()
def draft_chain(drafter, embed, lm_head, ids: torch.Tensor, hidden: torch.Tensor, spans, image_embeds,
                k: int, layers: torch.Tensor | None = None) -> list[int]:
    """k greedy drafts from the verified state: ids [T+1] (last = token not yet verified), hidden [T, H],
    layers [T, n, H] (a multi-layer drafter's intermediate target layers, `intermediate_layers`)."""
    H = hidden.shape[1]
    rec = {"input_ids": ids, "hidden": torch.cat([hidden, hidden.new_zeros(1, H)]), "prompt_len": len(ids),
           "spans": spans, "image_embeds": image_embeds if image_embeds is not None else hidden.new_zeros(0, H)}
    if layers is not None:
        rec.update(layers=torch.cat([layers, layers.new_zeros(1, *layers.shape[1:])]),
                   feature_layers=intermediate_layers(drafter))
    ex = drafter.example(rec)
    ex["features"] = drafter.core.combine_features(ex["features"])  # verified rows: [N, H] from the target
    ex["steps"] = torch.zeros_like(ex["positions"])
    drafts = []
    for step in range(1, k + 1):
        batch = {key: v[None] for key, v in ex.items()}
        emb, fuse = drafter.inputs(batch, embed)
        out = drafter.core(emb, fuse(batch["features"]), batch["positions"], steps=batch["steps"])
        tok = int(lm_head(out[0, -1]).argmax())
        drafts.append(tok)
        if step < k:
            ex = append_row(ex, tok, out[0, -1], step)
    return drafts


def verify(drafts: list[int], target_argmax: torch.Tensor) -> int:
    """Greedy chain acceptance: the longest prefix of drafts equal to the target's argmax."""
    a = 0
    while a < len(drafts) and drafts[a] == int(target_argmax[a]):
        a += 1
    return a


def intermediate_layers(drafter) -> tuple[int, ...]:
    """The target layers other than the final one that a (multi-layer) drafter reads."""
    spec = getattr(drafter.core, "spec", None)
    return () if spec is None else spec.intermediate_layers


@torch.no_grad()
def replay(target: HFTarget, drafter, embed, lm_head, item: PromptItem, k: int, max_tokens: int):
    """One request: returns (generated token ids, per-step accepted counts)."""
    from transformers import DynamicCache

    prompt, pixels = target.encode(item)
    spans = image_spans(prompt.tolist(), target.image_token_id)
    cache = DynamicCache()
    want = intermediate_layers(drafter)
    hidden, argmax, img = target.forward(prompt, cache, pixels, want)
    layers = target.layer_states if want else None  # [T, n, H]
    ids = torch.cat([prompt, argmax[-1:]])
    generated, accepted = [int(argmax[-1])], []
    done = generated[-1] == target.eos or max_tokens <= 1
    while not done:
        drafts = draft_chain(drafter, embed, lm_head, ids, hidden, spans, img, k, layers)
        h_new, am, _ = target.forward(torch.tensor([int(ids[-1]), *drafts]), cache, None, want)
        a = verify(drafts, am)
        accepted.append(a)
        new = drafts[:a] + [int(am[a])]
        cache.crop(len(ids) + a)
        hidden = torch.cat([hidden, h_new[: a + 1]])
        if want:
            layers = torch.cat([layers, target.layer_states[: a + 1]])
        ids = torch.cat([ids, torch.tensor(new)])
        for t in new:  # stop conditions apply after counting, as in vLLM
            generated.append(t)
            if t == target.eos or len(generated) >= max_tokens:
                done = True
                break
    return generated, accepted


@torch.no_grad()  # scoped: the trainer calls this between training runs (ablation)
def evaluate(target_dir: str, drafter_path: str, items: list[PromptItem], k: int = 5, max_tokens: int = 160,
             progress: bool = True) -> tuple[Acceptance, list[list[int]]]:
    target = HFTarget(target_dir)
    drafter = load_drafter(drafter_path)
    embed, lm_head, _ = frozen_target_parts(target_dir)
    per_pos = [0.0] * k
    drafts = acc = 0
    outputs = []
    for it in tqdm(items, desc=f"replay {drafter.kind}", disable=not progress):
        gen, accepted = replay(target, drafter, embed, lm_head, it, k, max_tokens)
        outputs.append(gen)
        drafts += len(accepted)
        acc += sum(accepted)
        for a in accepted:
            for j in range(a):
                per_pos[j] += 1
    return Acceptance(float(drafts), float(drafts * k), float(acc), per_pos), outputs


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="vllm-hivis evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--drafter", required=True)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--tinyworld", help="SPLIT:START:COUNT of tiny-world scenes (default: test:0:100)")
    src.add_argument("--jsonl", help='prompts file: one {"image": path|null, "prompt": text} per line '
                                     "(the format generate-data reads)")
    ap.add_argument("--prompt-kind", default="describe", help="tiny world only")
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--out", help="write the summary JSON here")
    args = ap.parse_args(argv)
    try:  # every input problem before the target is loaded
        if not 1 <= args.num_speculative_tokens <= 32 or args.max_tokens < 1:
            raise ValueError(f"-k must be in 1..32 and --max-tokens >= 1, got {args.num_speculative_tokens}, "
                             f"{args.max_tokens}")
        check_target(args.target)
        load_drafter(args.drafter)
        if args.jsonl:
            source = jsonl_source(args.jsonl)
        else:
            args.tinyworld = args.tinyworld or "test:0:100"
            source = tinyworld_source(args.tinyworld, image_size(args.target), args.prompt_kind)
        items = prompt_source(source)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    acc, _ = evaluate(args.target, args.drafter, items, args.num_speculative_tokens, args.max_tokens)
    text = json.dumps({"drafter": args.drafter, "prompts": args.jsonl or args.tinyworld,
                       "k": args.num_speculative_tokens, **acc.summary()}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
