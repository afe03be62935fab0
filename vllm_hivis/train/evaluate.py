"""Offline acceptance evaluator: replay greedy chain speculative decoding in plain torch.

    vllm-hivis evaluate --target DIR --drafter DRAFTER --tinyworld test:0:100 -k 5

The target (transformers, fp32) and a drafter of any kind (hivis, text-only, EAGLE with image
rows, ViSpec-style) run the same loop as vLLM: prefill samples the first token; then every step
the drafter proposes k tokens from the verified sequence (verified rows carry the target's
features, draft rows the drafter's own), the target verifies them in one forward pass, the
longest prefix matching the target's argmax is accepted plus one bonus token. Counting follows
vLLM's scheduler exactly: one draft per verification step, k draft tokens, accepted tokens =
sampled tokens - 1 (counted before stop truncation). The result is an `Acceptance`, the same
object `vllm_hivis.acceptance` builds from vLLM's counters, so the two compare directly.
Tree drafting plugs in by replacing `draft_chain` and the acceptance rule of `verify`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from ..acceptance import Acceptance
from ..checkpoint import DrafterSpec
from ..drafter_torch import HiViSDrafter
from .baselines import ViSpecDrafter
from .data import PromptItem, image_spans
from .examples import make_example
from .trainer import frozen_target_parts


def load_drafter(path: str) -> tuple[torch.nn.Module, str]:
    """(model, kind) for a hivis/text drafter, a vLLM EAGLE head or a ViSpec-style bundle."""
    p = Path(path)
    if (p / "vispec.json").is_file():
        return ViSpecDrafter.load(str(p)).eval(), "vispec"
    cfg = json.loads((p / "config.json").read_text())
    if "hivis" in cfg:
        d = HiViSDrafter.from_pretrained(p).eval()
        return d, "hivis" if d.spec.uses_target_features else "text"
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    spec = DrafterSpec(hidden_size=cfg["hidden_size"], vocab_size=cfg["vocab_size"])
    d = HiViSDrafter(LlamaConfig(**cfg), spec)
    d.load_state_dict({k: v.float() for k, v in load_file(str(p / "model.safetensors")).items()}, strict=False)
    return d.eval(), "eagle"


class Target:
    """The target VLM in transformers with a KV cache; returns post-norm hidden states + logits."""

    def __init__(self, target_dir: str):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.hf = LlavaForConditionalGeneration.from_pretrained(target_dir, dtype=torch.float32,
                                                                local_files_only=True).eval()
        self.processor = AutoProcessor.from_pretrained(target_dir, local_files_only=True)
        self.image_token_id = self.hf.config.image_token_index
        self.eos = self.processor.tokenizer.eos_token_id

    def encode(self, item: PromptItem):
        text = item.chat_text(self.processor)
        enc = self.processor(images=item.image, text=text, return_tensors="pt", add_special_tokens=False) \
            if item.image is not None else self.processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        return enc["input_ids"][0], enc.get("pixel_values")

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache, pixel_values=None):
        # ids: [T] new tokens -> (hidden [T, H], argmax [T], image embeds [N, H] or None)
        out = self.hf.model(input_ids=ids[None], past_key_values=cache, use_cache=True, pixel_values=pixel_values)
        h = out.last_hidden_state[0]
        img = out.image_hidden_states
        return h, self.hf.lm_head(h).argmax(-1), None if img is None else img.reshape(-1, h.shape[-1])


@torch.no_grad()
def draft_chain(drafter, kind: str, embed, lm_head, ids: torch.Tensor, hidden: torch.Tensor, spans, image_embeds,
                k: int) -> list[int]:
    """k greedy drafts from the verified state: ids [T+1] (last = token not yet verified), hidden [T, H]."""
    H = hidden.shape[1]
    rec = {"input_ids": ids, "hidden": torch.cat([hidden, hidden.new_zeros(1, H)]), "prompt_len": len(ids),
           "spans": spans, "image_embeds": image_embeds if image_embeds is not None else hidden.new_zeros(0, H)}
    ex = make_example(rec, kind)
    model = drafter
    d = getattr(model, "drafter", model)
    emb = embed(ex["input_ids"].clamp(min=0))[None]
    feats, pos = ex["features"][None], ex["positions"][None]
    fuse = lambda f: f  # noqa: E731
    if kind == "vispec":
        batch = {"image_embeds": ex["image_embeds"][None]}
        adapted = model.adapt(batch)
        emb = model.adaptor_embeds(emb, adapted, ex["is_adaptor"][None])
        after = ex["after_image"][None]
        fuse = lambda f: model.fuse(f, adapted, after)  # noqa: E731
    steps = torch.zeros_like(pos)
    out = d(emb, fuse(feats), pos, steps=steps)
    drafts = []
    for step in range(1, k + 1):
        tok = int(lm_head(out[0, -1]).argmax())
        drafts.append(tok)
        if step == k:
            break
        emb = torch.cat([emb, embed(torch.tensor([[tok]]))], 1)
        feats = torch.cat([feats, out[:, -1:]], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        steps = torch.cat([steps, torch.full_like(steps[:, -1:], step)], 1)
        if kind == "vispec":
            after = torch.cat([after, after[:, -1:]], 1)
        out = d(emb, fuse(feats), pos, steps=steps)
    return drafts


def verify(drafts: list[int], target_argmax: torch.Tensor) -> int:
    """Greedy chain acceptance: the longest prefix of drafts equal to the target's argmax."""
    a = 0
    while a < len(drafts) and drafts[a] == int(target_argmax[a]):
        a += 1
    return a


@torch.no_grad()
def replay(target: Target, drafter, kind: str, embed, lm_head, item: PromptItem, k: int, max_tokens: int):
    """One request: returns (generated token ids, per-step accepted counts)."""
    from transformers import DynamicCache

    prompt, pixels = target.encode(item)
    spans = image_spans(prompt.tolist(), target.image_token_id)
    cache = DynamicCache()
    hidden, argmax, img = target.forward(prompt, cache, pixels)
    ids = torch.cat([prompt, argmax[-1:]])
    generated, accepted = [int(argmax[-1])], []
    done = generated[-1] == target.eos or max_tokens <= 1
    while not done:
        drafts = draft_chain(drafter, kind, embed, lm_head, ids, hidden, spans, img, k)
        h_new, am, _ = target.forward(torch.tensor([int(ids[-1]), *drafts]), cache)
        a = verify(drafts, am)
        accepted.append(a)
        new = drafts[:a] + [int(am[a])]
        cache.crop(len(ids) + a)
        hidden = torch.cat([hidden, h_new[: a + 1]])
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
    target = Target(target_dir)
    drafter, kind = load_drafter(drafter_path)
    embed, lm_head, _ = frozen_target_parts(target_dir)
    per_pos = [0.0] * k
    drafts = acc = 0
    outputs = []
    for it in tqdm(items, desc=f"replay {kind}", disable=not progress):
        gen, accepted = replay(target, drafter, kind, embed, lm_head, it, k, max_tokens)
        outputs.append(gen)
        drafts += len(accepted)
        acc += sum(accepted)
        for a in accepted:
            for j in range(a):
                per_pos[j] += 1
    return Acceptance(float(drafts), float(drafts * k), float(acc), per_pos), outputs


def main(argv=None) -> int:
    import argparse

    from .generate import check_target, prompt_source

    ap = argparse.ArgumentParser(prog="vllm-hivis evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--tinyworld", default="test:0:100", help="SPLIT:START:COUNT")
    ap.add_argument("--prompt-kind", default="describe")
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--out", help="write the summary JSON here")
    args = ap.parse_args(argv)
    cfg = check_target(args.target)
    split, start, count = args.tinyworld.split(":")
    items = prompt_source({"kind": "tinyworld", "split": split, "start": int(start), "count": int(count),
                           "image_size": int(cfg["vision_config"]["image_size"]), "prompt_kind": args.prompt_kind})
    acc, _ = evaluate(args.target, args.drafter, items, args.num_speculative_tokens, args.max_tokens)
    text = json.dumps({"drafter": args.drafter, "prompts": args.tinyworld, "k": args.num_speculative_tokens,
                       **acc.summary()}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
