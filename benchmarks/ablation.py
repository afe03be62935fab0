"""Training ablation: acceptance of drafters trained with the same data and budget.

    python benchmarks/ablation.py --data runs/drafter-data --target hivis_testbed/assets/tiny-target \
        --steps 1500 --out benchmarks/results/ablation

Rows: the HiViS recipe ladder (single-step EAGLE distillation, + multi-step self-feedback,
+ dynamic data selection, + sequential embedding supervision = v1, + step-dependent bias
residuals, + time-step-aware weighting = v2) and, beside it, a text-only drafter, an EAGLE drafter
that sees the image tokens (vLLM's own EAGLE format) and a ViSpec-style drafter, all with the same
steps, batch and data. Acceptance comes from the offline replay (vllm_hivis.train.evaluate, which
counts exactly like vLLM) on held-out tiny-world prompts, k draft tokens per step.
Writes <out>.json, <out>.md (table) and <out>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

ROWS = [  # (label, kind, recipe)
    ("single-step (EAGLE baseline recipe)", "hivis", "single-step"),
    ("+ multi-step self-feedback (v1)", "hivis", "self-feedback"),
    ("+ dynamic data selection (v1)", "hivis", "data-selection"),
    ("+ sequential embedding supervision (v1)", "hivis", "seq-embed"),
    ("+ step-dependent bias residuals (v2)", "hivis", "step-bias"),
    ("+ time-step-aware weighting (v2)", "hivis", "time-aware"),
    ("text-only drafter (no target features)", "text", "time-aware"),
    ("EAGLE drafter that sees image tokens", "eagle", "seq-embed"),
    ("ViSpec-style drafter (adaptor, 2 queries)", "vispec", "time-aware"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--out", default="benchmarks/results/ablation")
    ap.add_argument("--runs", default="runs/ablation", help="where the drafters are trained")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--unroll", type=int, default=4)
    ap.add_argument("--eval", default="test:0:60", help="held-out tiny-world prompts SPLIT:START:COUNT")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--only", help="comma list of row indices to run")
    args = ap.parse_args(argv)

    from vllm_hivis.train.evaluate import evaluate
    from vllm_hivis.train.generate import prompt_source
    from vllm_hivis.train.losses import Recipe
    from vllm_hivis.train.target import image_size
    from vllm_hivis.train.trainer import TrainConfig, train

    size = image_size(args.target)
    split, start, count = args.eval.split(":")
    half = int(count) // 2
    items = prompt_source({"kind": "tinyworld", "split": split, "start": int(start), "count": half,
                           "image_size": size, "prompt_kind": "describe"}) + \
        prompt_source({"kind": "tinyworld", "split": split, "start": int(start) + 10_000, "count": int(count) - half,
                       "image_size": size, "prompt_kind": "mix"})
    out_json = Path(args.out + ".json")
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    only = None if not args.only else {int(i) for i in args.only.split(",")}
    for i, (label, kind, recipe_name) in enumerate(ROWS):
        if only is not None and i not in only:
            continue
        recipe = Recipe.named(recipe_name, kind=kind, unroll=args.unroll)
        run = Path(args.runs) / f"{i}-{kind}-{recipe_name}"
        t0 = time.time()
        train(TrainConfig(data=args.data, target=args.target, out=str(run), recipe=dataclasses.asdict(recipe),
                          steps=args.steps, batch_size=args.batch_size))
        train_s = time.time() - t0
        acc, _ = evaluate(args.target, str(run / "drafter"), items, k=args.k)
        results[label] = {"kind": kind, "recipe": recipe_name, "train_seconds": round(train_s), **acc.summary()}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{label}: {acc.tokens_per_step:.2f} tokens/step, {acc.accepted_per_draft:.2f} accepted/draft")
    write_table(results, args, Path(args.out + ".md"))
    plot(results, Path(args.out + ".png"), args.k)
    return 0


def write_table(results: dict, args, path: Path) -> None:
    lines = [f"Acceptance on held-out tiny-world prompts ({args.eval}: half descriptions, half mixed QA), "
             f"k={args.k} draft tokens per step, greedy; every drafter trained {args.steps} steps x batch "
             f"{args.batch_size} on the same data (`{args.data}`), unroll {args.unroll}.",
             "Offline replay (`vllm_hivis.train.evaluate`), which counts exactly like vLLM's spec-decode metrics.",
             "", "| drafter / recipe | accepted per step (τ, excl. bonus) | tokens per step (incl. bonus) | "
                 "per-position acceptance | train s |", "|---|---|---|---|---|"]
    for label, r in results.items():
        pp = " ".join(f"{x:.2f}" for x in r["per_position"])
        lines.append(f"| {label} | {r['accepted_per_draft']:.3f} | {r['tokens_per_step']:.3f} | {pp} | "
                     f"{r['train_seconds']} |")
    lines += ["", f"Command: `python benchmarks/ablation.py --data {args.data} --target {args.target} "
                  f"--steps {args.steps} --eval {args.eval} -k {args.k}`"]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    ax[0].barh(range(len(labels)), [results[x]["accepted_per_draft"] for x in labels], color="tab:blue")
    ax[0].set_yticks(range(len(labels)), labels, fontsize=8)
    ax[0].invert_yaxis()
    ax[0].set_xlabel("accepted draft tokens per step (τ)")
    for x in labels:
        ax[1].plot(range(1, k + 1), results[x]["per_position"], marker="o", label=x)
    ax[1].set_xlabel("draft position")
    ax[1].set_ylabel("acceptance rate")
    ax[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
