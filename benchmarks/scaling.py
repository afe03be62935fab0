"""hivis against vLLM's own image-seeing EAGLE as image tokens per request and output length grow.

    python benchmarks/scaling.py --out benchmarks/results/scaling           # ~10 min on 2 CPU cores
    python benchmarks/scaling.py --quick --out /tmp/scaling                  # CI

End to end on the tiny target (144 image tokens per image): prompts with 1, 2, 4 and 6 tiny-world
images (144 to 864 image tokens; the target's context is 1024), greedy, batch 1, output lengths
32 and 128, one in-process engine per method (benchmarks/offline.py's sweep). Both drafters were
trained on one-image prompts, so acceptance falls with more images for both; the figures to read
are the drafter's prefill rows and its time per step, and the resulting tokens/s ratio. The
drafter's own cost at llava-1.5 sizes (576..2304 image tokens, hidden 1024) is in
benchmarks/drafter_scaling.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import med, meta, pyplot, spread, write  # noqa: E402
from offline import sweep  # noqa: E402

IMAGE_TOKENS = 144


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/scaling")
    ap.add_argument("--methods", default="no-spec,eagle,hivis")
    ap.add_argument("--images", default="1,2,4,6")
    ap.add_argument("--lengths", default="32,128")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.lengths, args.n, args.reps = "1,2", "16", 1, 1
    images = [int(x) for x in args.images.split(",")]
    args.workloads = [f"images-{m}" for m in images]
    args.methods, args.temps, args.batches = args.methods.split(","), ["0"], args.batches.split(",")
    args.target = "tiny"  # offline.sweep's target: the LLaVA-1.5 tiny target (144 image tokens per image)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    rows = sweep(args, limit_mm_per_prompt={"image": max(images)}, max_model_len=1024)
    for r in rows:
        r["image_tokens"] = IMAGE_TOKENS * int(r["workload"].removeprefix("images-"))
    m = meta(argv, "scaling.py", k=args.k, n=args.n, reps=args.reps)
    lines = [f"hivis vs vLLM EAGLE (drafter sees image tokens), tiny target, {m['machine']}, vLLM {m['vllm']}, "
             f"greedy, k={args.k}, {args.n} prompts per cell, {args.reps} repetitions (tokens/s: median [range]).", "",
             "| image tokens | batch | max tokens | method | tokens/s | hivis / eagle | drafter prefill rows "
             "| target prefill | draft ms/step | drafting share | tokens/step | = no-spec |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cell = lambda r: (r["image_tokens"], r["batch"], r["max_tokens"])  # noqa: E731
    by = {(cell(r), r["method"]): r for r in rows}
    for r in sorted(rows, key=lambda r: (*cell(r), r["method"])):
        e, h = by.get((cell(r), "eagle")), by.get((cell(r), "hivis"))
        ratio = f"{med(h['tokens_per_s']) / med(e['tokens_per_s']):.2f}x" if e and h and r["method"] == "hivis" else ""
        a = r.get("acceptance")
        eq = {True: "yes", False: "**NO**", None: "n/a"}[r["same_tokens_as_no_spec"]]
        lines.append(f"| {r['image_tokens']} | {r['batch']} | {r['max_tokens']} | {r['method']} | "
                     f"{spread(r['tokens_per_s'])} | {ratio} | {r.get('drafter_prefill_tokens', '')} | "
                     f"{r['target_prefill_tokens']:.0f} | {r['draft_ms_per_step']:.2f} | "
                     f"{100 * r['drafting_share']:.1f}% | {a['tokens_per_step'] if a else 1.0:.2f} | {eq} |")
    write(args.out, m, [{k: v for k, v in r.items() if k != "outputs"} for r in rows], lines)
    plot(rows, args.out)
    print("\n".join(lines))
    return 1 if any(r["same_tokens_as_no_spec"] is False for r in rows) else 0


def plot(rows, out: str) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for n_out in sorted({r["max_tokens"] for r in rows}):
        for meth, style in (("hivis", "-"), ("eagle", "--")):
            pts = sorted((r["image_tokens"], r["draft_ms_per_step"]) for r in rows
                         if r["method"] == meth and r["max_tokens"] == n_out and r["batch"] == rows[0]["batch"])
            a1.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{meth}, {n_out} tokens")
        pts = []
        for r in rows:
            if r["method"] == "hivis" and r["max_tokens"] == n_out and r["batch"] == rows[0]["batch"]:
                e = next((x for x in rows if x["method"] == "eagle" and x["workload"] == r["workload"]
                          and x["max_tokens"] == n_out and x["batch"] == r["batch"]), None)
                if e:
                    pts.append((r["image_tokens"], med(r["tokens_per_s"]) / med(e["tokens_per_s"])))
        pts.sort()
        a2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{n_out} tokens")
    a1.set_xlabel("image tokens per request")
    a1.set_ylabel("drafting ms per step")
    a1.legend(fontsize=7)
    a2.axhline(1.0, color="grey", lw=0.5)
    a2.set_xlabel("image tokens per request")
    a2.set_ylabel("tokens/s, hivis / eagle")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
