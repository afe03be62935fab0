"""Train the tiny-world target LLaVA from scratch (CPU, fp32 by default), then export it.

    python -m hivis_testbed.tinyworld.train_target --out runs/target --steps 12000

Loss = next-token CE on answer tokens (+EOS) + ``aux_weight`` x a per-image-token auxiliary loss:
every image token (after the projector) predicts the contents of its grid cell (shape, colour,
size; "empty" included) and the background. The auxiliary head only speeds up learning of the
vision pathway; it is dropped at export, and the exported model is a plain
``LlavaForConditionalGeneration``. Samples are a pure function of (step, slot), so a run is
reproducible from its seed and resumable from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import build
from .batches import collate
from .dataset import sample
from .scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene

GRID = 3


ATTRS = ("shape", "colour", "size")


class CellProbe(torch.nn.Module):
    """Auxiliary classifiers on the image-token embeddings (dropped at export).

    Per token: shape / colour / size (0 = empty) and the background. With ``--aux mask`` (stage 2)
    the token targets come from the object mask (the object covering >= 30% of the patch), and
    cell heads classify each cell's mean-pooled tokens, teaching features a reader can pool."""

    def __init__(self, hidden: int):
        super().__init__()
        self.shape = torch.nn.Linear(hidden, len(SHAPES) + 1)  # 0 = empty
        self.colour = torch.nn.Linear(hidden, len(COLOURS) + 1)
        self.size = torch.nn.Linear(hidden, len(SIZES) + 1)
        self.background = torch.nn.Linear(hidden, len(BACKGROUNDS))
        self.cell = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, getattr(self, k).out_features) for k in ATTRS})

    def loss(self, feats: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        # feats: [B, N, H] image-token embeddings; targets[k]: [B, N] class per token,
        # optionally targets["cell_" + k]: [B, 9] class per cell
        ce = lambda logits, t: F.cross_entropy(logits.flatten(0, -2).float(), t.flatten())  # noqa: E731
        terms = [ce(getattr(self, k)(feats), targets[k]) for k in (*ATTRS, "background")]
        if "cell_shape" in targets:
            side = int(feats.shape[1] ** 0.5)
            per = side // GRID
            cells = feats.view(feats.shape[0], GRID, per, GRID, per, -1).mean((2, 4)).flatten(1, 2)  # [B, 9, H]
            terms += [ce(self.cell[k](cells), targets["cell_" + k]) for k in ATTRS]
        return sum(terms) / len(terms)


def cell_targets(scenes: list[Scene], side: int) -> dict[str, torch.Tensor]:
    """Per image token (row-major over a side x side patch grid) class ids of its cell."""
    per = side // GRID
    cell_of = torch.tensor([(r // per) * GRID + (c // per) for r in range(side) for c in range(side)])
    out = {k: torch.zeros(len(scenes), 9, dtype=torch.long) for k in ("shape", "colour", "size")}
    bg = torch.zeros(len(scenes), side * side, dtype=torch.long)
    for i, s in enumerate(scenes):
        for o in s.objects:
            out["shape"][i, o.cell] = 1 + SHAPES.index(o.shape)
            out["colour"][i, o.cell] = 1 + list(COLOURS).index(o.colour)
            out["size"][i, o.cell] = 1 + list(SIZES).index(o.size)
        bg[i] = list(BACKGROUNDS).index(s.background)
    res = {k: v[:, cell_of] for k, v in out.items()}
    res["background"] = bg
    return res


def mask_targets(samples, side: int, coverage: float = 0.3) -> dict[str, torch.Tensor]:
    """Per token: attributes of the object covering >= `coverage` of its patch; per cell: its object."""
    B, patch = len(samples), samples[0].mask.shape[0] // side
    cell = cell_targets([s.scene for s in samples], side)
    out = {k: torch.zeros(B, side * side, dtype=torch.long) for k in ATTRS}
    out["background"] = cell["background"]
    for i, s in enumerate(samples):
        m = torch.from_numpy(s.mask.astype("int64")).view(side, patch, side, patch)
        m = m.permute(0, 2, 1, 3).reshape(side * side, -1)
        counts = F.one_hot(m, len(s.scene.objects) + 1)[:, :, 1:].sum(1)  # [N, objects] pixels per object
        best = counts.argmax(1)
        covered = counts.max(1).values >= coverage * patch * patch
        for k, o in enumerate(s.scene.objects):
            sel = covered & (best == k)
            out["shape"][i, sel] = 1 + SHAPES.index(o.shape)
            out["colour"][i, sel] = 1 + list(COLOURS).index(o.colour)
            out["size"][i, sel] = 1 + list(SIZES).index(o.size)
    per = side // GRID
    first_token_of_cell = torch.tensor([(c // GRID) * per * side + (c % GRID) * per for c in range(9)])
    for k in ATTRS:  # cell_targets repeats each cell's class over its tokens: take one per cell
        out["cell_" + k] = cell[k][:, first_token_of_cell]
    return out


def sincos_2d_(pos_embedding: torch.nn.Embedding, side: int) -> None:
    """Initialise CLIP's learned position table (CLS + side^2 patches) with 2-D sin-cos."""
    dim = pos_embedding.weight.shape[1]
    assert dim % 4 == 0
    q = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(q, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    fy, fx = ys.flatten()[:, None] * omega, xs.flatten()[:, None] * omega
    table = torch.cat([fy.sin(), fy.cos(), fx.sin(), fx.cos()], dim=1)
    with torch.no_grad():
        pos_embedding.weight[1:] = table
        pos_embedding.weight[0] = 0


def forward_losses(model, probe, ids, labels, att, pix, samples, side, aux_weight, aux="cell"):
    inner = model.model
    feats = inner.get_image_features(pixel_values=pix, vision_feature_layer=-1,
                                     vision_feature_select_strategy="default").pooler_output
    feats = torch.stack(list(feats))  # [B, N, H]
    emb = inner.get_input_embeddings()(ids)
    emb = emb.masked_scatter((ids == build.IMAGE_TOKEN_ID).unsqueeze(-1), feats.to(emb.dtype))
    hidden = inner.language_model(inputs_embeds=emb, attention_mask=att).last_hidden_state
    logits = model.lm_head(hidden[:, :-1]).float()
    lm = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    if aux_weight <= 0:
        return lm, torch.zeros(())
    targets = mask_targets(samples, side) if aux == "mask" else cell_targets([s.scene for s in samples], side)
    return lm, probe.loss(feats, targets)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run dir: checkpoints, log, and the exported model in out/model")
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--image-size", type=int, default=126)
    ap.add_argument("--text-hidden", type=int, default=192)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast: faster only on CPUs with native bf16 (AMX/AVX512-BF16); "
                         "~18x slower on AVX2-only machines")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (resumably) after this long; 0 = no limit")
    ap.add_argument("--stop-at", type=int, default=0, help="stop (resumably) at this step; the schedule still "
                                                           "spans --steps")
    ap.add_argument("--export-only", action="store_true", help="export the last checkpoint to out/model and exit")
    ap.add_argument("--aux", choices=["cell", "mask"], default="cell",
                    help="auxiliary targets: every token of a cell gets its object (stage 1), or only the tokens "
                         "the object covers, plus pooled per-cell heads (stage 2)")
    ap.add_argument("--init-from", help="stage 2: start from this checkpoint.pt (model weights; fresh optimizer)")
    ap.add_argument("--sample-offset", type=int, default=0, help="first training sample index (stage 2: unseen scenes)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    if not tok_dir.exists() and args.init_from and (Path(args.init_from).parent / "tokenizer").is_dir():
        __import__("shutil").copytree(Path(args.init_from).parent / "tokenizer", tok_dir)  # same ids as stage 1
    if not tok_dir.exists():
        build.train_tokenizer().save_pretrained(tok_dir)
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    cfg = build.make_config(len(tok), image_size=args.image_size, text_hidden=args.text_hidden,
                            text_layers=args.text_layers, vision_layers=args.vision_layers)
    side = args.image_size // build.PATCH_SIZE
    model = LlavaForConditionalGeneration(cfg)
    sincos_2d_(model.model.vision_tower.embeddings.position_embedding, side)
    probe = CellProbe(cfg.text_config.hidden_size)
    params = list(model.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    start, log_path, ckpt = 0, out / "train_log.jsonl", out / "checkpoint.pt"
    if args.init_from and not ckpt.exists():
        st = torch.load(args.init_from, weights_only=True)
        model.load_state_dict(st["model"])
        probe.load_state_dict(st["probe"], strict=False)  # the cell heads are new in stage 2
        print(f"initialised from {args.init_from} (step {st['step']})")
    if ckpt.exists():  # resume (training state only; never shipped)
        st = torch.load(ckpt, weights_only=True)
        model.load_state_dict(st["model"])
        probe.load_state_dict(st["probe"], strict=False)
        opt.load_state_dict(st["opt"])
        start = st["step"]
        print(f"resumed from step {start}")
    t0, ema, ema_aux = time.time(), None, None
    if args.export_only:
        args.steps = start
    model.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="target", mininterval=5)
    for step in bar:
        batch = [sample("train", args.sample_offset + step * args.batch_size + j, args.image_size)
                 for j in range(args.batch_size)]
        ids, labels, att, pix = collate(tok, batch, side * side)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            lm, aux = forward_losses(model, probe, ids, labels, att, pix, batch, side, args.aux_weight, args.aux)
        loss = lm + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = lm.item() if ema is None else 0.98 * ema + 0.02 * lm.item()
        ema_aux = aux.item() if ema_aux is None else 0.98 * ema_aux + 0.02 * aux.item()
        bar.set_postfix(lm=f"{ema:.3f}", aux=f"{ema_aux:.3f}")
        done = step + 1
        if done % 50 == 0:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": done, "lm_loss": ema, "aux_loss": ema_aux,
                                    "lr": opt.param_groups[0]["lr"], "elapsed_s": time.time() - t0}) + "\n")
        stop = (args.max_minutes and (time.time() - t0) > 60 * args.max_minutes) or done == args.stop_at
        if done % args.ckpt_every == 0 or done == args.steps or stop:
            torch.save({"model": model.state_dict(), "probe": probe.state_dict(), "opt": opt.state_dict(),
                        "step": done}, ckpt)
        if stop:
            print(f"stopped at step {done} (resume by re-running without --stop-at/--max-minutes)")
            return
    model.eval()
    prov = {"command": "python -m hivis_testbed.tinyworld.train_target " + " ".join(argv or __import__("sys").argv[1:]),
            "args": vars(args), "commit": git_commit(), "final_lm_loss": ema, "final_aux_loss": ema_aux,
            "train_seconds_this_run": time.time() - t0, "samples": args.steps * args.batch_size,
            "torch": torch.__version__}
    build.save_llava(model, build.make_processor(tok, args.image_size), out / "model", provenance=prov)
    print(f"exported {out / 'model'}")


if __name__ == "__main__":
    main()
