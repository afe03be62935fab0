"""Equal-budget drafter comparison: hivis (last layer / multi-layer features) against drafters that
see the image, over several training seeds, on held-out tiny-world scenes and on real photographs.

    python benchmarks/equal_budget.py --data runs/ml-data --target hivis_testbed/assets/tiny-target \
        --steps 1500 --seeds 0,1 --out benchmarks/results/equal_budget

Every drafter is trained on the same dataset (one `generate-data` run that also recorded the
target's intermediate layers: ``--feature-layers``), with the same steps, batch, unroll and
seeds; each kind gets the strongest recipe its format allows (time-aware; seq-embed for vLLM's
EAGLE head, which has no step biases). Acceptance comes from the offline replay
(vllm_hivis.train.evaluate, which counts exactly like vLLM's spec-decode metrics; a parity test
holds the two together), greedy, k draft tokens per step, on two workloads:
  tinyworld  held-out test scenes: half "describe", half mixed QA (as benchmarks/ablation.py)
  photos     scikit-image's bundled photographs with general questions (benchmarks/workloads.py)
Both conventions are reported: τ = accepted drafts per step (excl. the bonus token) and tokens per
step (incl. it). Spread = min..max over seeds. Writes <out>.json, <out>.md and <out>.png; a
rerun skips (seed, row) pairs already in <out>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = {  # key: (label, kind, recipe, feature_layers[, unroll: overrides --unroll])
    "last": ("hivis, last layer (shipped recipe)", "hivis", "time-aware", None),
    "ml124": ("hivis, layers 1,2,4 fused", "hivis", "time-aware", [1, 2, 4]),
    "ml1234": ("hivis, layers 1,2,3,4 fused", "hivis", "time-aware", [1, 2, 3, 4]),
    "ml124u6": ("hivis, layers 1,2,4 fused, unroll 6", "hivis", "time-aware", [1, 2, 4], 6),
    "vispec": ("ViSpec-style (image adaptor, 2 queries)", "vispec", "time-aware", None),
    "eagle": ("EAGLE, reads all image tokens", "eagle", "seq-embed", None),
}
WORKLOADS = ("tinyworld", "photos")


def eval_items(name: str, n: int, target: str):
    from vllm_hivis.train.prompts import PromptItem, prompt_source
    from vllm_hivis.train.target import image_size

    size = image_size(target)
    if name == "tinyworld":
        half = n // 2
        src = {"kind": "tinyworld", "split": "test", "image_size": size}
        return (prompt_source({**src, "start": 0, "count": half, "prompt_kind": "describe"})
                + prompt_source({**src, "start": 10_000, "count": n - half, "prompt_kind": "mix"}))
    from workloads import cases

    return [PromptItem(f"photo{i}", q, imgs[0]) for i, (q, imgs) in enumerate(cases("photos", n, size))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a dataset with the intermediate layers the rows need")
    ap.add_argument("--target", required=True)
    ap.add_argument("--out", default="benchmarks/results/equal_budget")
    ap.add_argument("--runs", default="runs/equal-budget", help="where the drafters are trained")
    ap.add_argument("--rows", default="last,ml124,vispec,eagle", help=f"comma list of {list(ROWS)}")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--unroll", type=int, default=4)
    ap.add_argument("--tinyworld-n", type=int, default=60)
    ap.add_argument("--photos-n", type=int, default=24)
    ap.add_argument("-k", type=int, default=5)
    args = ap.parse_args(argv)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; expected some of {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    from common import meta

    from vllm_hivis.train.evaluate import evaluate
    from vllm_hivis.train.losses import Recipe
    from vllm_hivis.train.trainer import TrainConfig, train

    items = {w: eval_items(w, getattr(args, f"{w}_n"), args.target) for w in WORKLOADS}
    out_json = Path(args.out + ".json")
    old = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results = old.get("results", [])
    # every invocation that added rows (a rerun with more seeds or rows extends the same table)
    commands = old.get("meta", {}).get("commands") or ([old["meta"]["command"]] if old else [])
    done = {(r["row"], r["seed"]) for r in results}
    for seed in seeds:  # every row at seed 0 first: a partial run already compares them all
        for key in rows:
            if (key, seed) in done:
                continue
            label, kind, recipe_name, layers, *unroll = ROWS[key]
            named = Recipe.named(recipe_name, kind=kind, unroll=unroll[0] if unroll else args.unroll)
            recipe = dataclasses.replace(named, feature_layers=layers).checked()
            run = Path(args.runs) / f"{key}-seed{seed}"
            t0 = time.time()
            train(TrainConfig(data=args.data, target=args.target, out=str(run), recipe=dataclasses.asdict(recipe),
                              steps=args.steps, batch_size=args.batch_size, seed=seed))
            rec = {"row": key, "label": label, "kind": kind, "recipe": recipe_name, "feature_layers": layers,
                   "unroll": recipe.unroll, "seed": seed, "train_seconds": round(time.time() - t0)}
            for w in WORKLOADS:
                acc, _ = evaluate(args.target, str(run / "drafter"), items[w], k=args.k)
                rec[w] = acc.summary()
                print(f"{label} seed {seed} {w}: τ {acc.accepted_per_draft:.3f}", flush=True)
            results.append(rec)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            m = meta(argv, "equal_budget.py", steps=args.steps, batch_size=args.batch_size, unroll=args.unroll,
                     data=args.data, k=args.k)
            if not commands or commands[-1] != m["command"]:
                commands.append(m["command"])
            m["commands"] = commands
            out_json.write_text(json.dumps({"meta": m, "results": results}, indent=2) + "\n")
    m = json.loads(out_json.read_text())["meta"]
    write_table(results, args, m, Path(args.out + ".md"))
    plot(results, Path(args.out + ".png"))
    return 0


def by_row(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["row"], []).append(r)
    return out


def cell(vals: list[float]) -> str:
    """'mean (min..max)' over seeds."""
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ({min(vals):.3f}..{max(vals):.3f})"


def write_table(results: list[dict], args, m: dict, path: Path) -> None:
    lines = [f"Equal budget: every drafter trained {args.steps} steps x batch {args.batch_size}, unroll "
             f"{args.unroll} (unless a row says otherwise), on the same data (`{args.data}`), training seeds as "
             f"listed; k={args.k}, greedy, offline replay (counts like vLLM). τ = accepted drafts per step (excl. "
             "bonus); tokens/step = τ + 1. Cells: mean over seeds (min..max).", ""]
    for w, what in (("tinyworld", f"held-out tiny-world scenes ({args.tinyworld_n}: half describe, half QA)"),
                    ("photos", f"real photographs, out of the tiny world ({args.photos_n} prompts)")):
        lines += [f"**{what}**", "", "| drafter | training seeds | τ accepted/step | tokens/step | per-position "
                  "acceptance (mean) | train s |", "|---|---|---|---|---|---|"]
        for rs in by_row(results).values():
            tau = [r[w]["accepted_per_draft"] for r in rs]
            pp = [statistics.mean(r[w]["per_position"][j] for r in rs) for j in range(len(rs[0][w]["per_position"]))]
            secs = round(statistics.mean(r["train_seconds"] for r in rs))
            seeds = ",".join(str(r["seed"]) for r in rs)
            lines.append(f"| {rs[0]['label']} | {seeds} | {cell(tau)} | {cell([t + 1 for t in tau])} | "
                         f"{' '.join(f'{x:.2f}' for x in pp)} | {secs} |")
        lines.append("")
    dirty = ", uncommitted changes" if m["dirty"] else ""
    cmds = " then ".join(f"`{c}`" for c in m.get("commands") or [m["command"]])
    lines.append(f"Commands: {cmds} (last: commit {m['commit']}{dirty}, {m['machine']}, {m['date']})")
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], path: Path) -> None:
    from common import pyplot

    plt = pyplot()
    groups = by_row(results)
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(12, 4))
    for ax, w in zip(axes, WORKLOADS):
        labels = [rs[0]["label"] for rs in groups.values()]
        taus = [[r[w]["accepted_per_draft"] for r in rs] for rs in groups.values()]
        means = [statistics.mean(t) for t in taus]
        err = [[m - min(t) for m, t in zip(means, taus)], [max(t) - m for m, t in zip(means, taus)]]
        ax.barh(range(len(labels)), means, xerr=err, color="tab:blue", capsize=3)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("τ, accepted drafts per step (mean; whiskers: min..max over seeds)", fontsize=8)
        ax.set_title(w)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
