"""No-spec vs hivis (vs vLLM's EAGLE with an image-seeing head) on the tiny target, one run.

    python benchmarks/offline.py --out benchmarks/results/offline [--eagle runs/ablation/.../drafter]

For each method and batch size: one vLLM engine (default multiprocess mode, the CPU build), the
same held-out tiny-world prompts (descriptions, greedy, up to 160 tokens), wall time of
`generate` after a warm-up batch, output tokens/s, and vLLM's own spec-decode counters
(acceptance in both conventions) plus hivis's drafter/target prefill counters. Ratios are only
meaningful within one run on one machine: they are printed side by side.
Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def run_method(name: str, spec: dict | None, prompts, batch: int, args) -> dict:
    from vllm import LLM, SamplingParams

    from hivis_testbed import assets
    from vllm_hivis.serving.acceptance import from_llm_metrics

    llm = LLM(model=assets.tiny_target(), dtype="float32", max_model_len=512, enforce_eager=True,
              gpu_memory_utilization=0.25, speculative_config=spec, disable_log_stats=False, max_num_seqs=batch,
              limit_mm_per_prompt={"image": 1}, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=160)
    llm.generate(prompts[:batch], sp, use_tqdm=False)  # warm-up
    before = from_llm_metrics(llm.get_metrics())
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    acc = from_llm_metrics(llm.get_metrics()).minus(before)
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    return {"method": name, "batch": batch, "requests": len(prompts), "output_tokens": n_tok,
            "wall_s": round(wall, 3), "tokens_per_s": round(n_tok / wall, 1),
            "outputs": [list(o.outputs[0].token_ids) for o in outs], **({"acceptance": acc.summary()} if spec else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/offline")
    ap.add_argument("--n", type=int, default=32, help="held-out prompts")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--eagle", help="an EAGLE-format drafter (image-seeing baseline) to serve with method eagle")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from hivis_testbed import assets
    from hivis_testbed.tinyworld.build import prompt_text
    from hivis_testbed.tinyworld.dataset import sample

    size = json.loads((Path(assets.tiny_target()) / "config.json").read_text())["vision_config"]["image_size"]
    prompts = [{"prompt": "<s>" + prompt_text(s.qa.question), "multi_modal_data": {"image": s.image}}
               for s in (sample("test", 2000 + i, size, kind="describe") for i in range(args.n))]
    methods = [("no-spec", None),
               ("hivis", {"method": "hivis", "model": assets.tiny_drafter(), "num_speculative_tokens": args.k})]
    if args.eagle:
        methods.append(("eagle (sees image tokens)", {"method": "eagle", "model": args.eagle,
                                                      "num_speculative_tokens": args.k}))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name, spec in methods:
            r = run_method(name, spec, prompts, batch, args)
            rows.append(r)
            print(f"batch {batch:2d} {name:28s} {r['tokens_per_s']:8.1f} tok/s "
                  + (f"acceptance {r['acceptance']['tokens_per_step']:.2f} tok/step" if spec else ""), flush=True)
    base = {r["batch"]: r for r in rows if r["method"] == "no-spec"}
    for r in rows:
        r["speedup_vs_no_spec"] = round(r["tokens_per_s"] / base[r["batch"]]["tokens_per_s"], 3)
        r["same_output_as_no_spec"] = r["outputs"] == base[r["batch"]]["outputs"]
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "k": args.k,
            "prompts": f"test split scenes 2000..{2000 + args.n - 1}, describe, greedy, max 160 tokens",
            "command": "python benchmarks/offline.py " + " ".join(argv or __import__("sys").argv[1:])}
    Path(args.out + ".json").parent.mkdir(parents=True, exist_ok=True)
    table = [{k: v for k, v in r.items() if k != "outputs"} for r in rows]
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": table}, indent=2) + "\n")
    lines = [f"Tiny target on {meta['machine']} (vLLM 0.32.0 CPU build, V1 runner, fp32, eager), {meta['prompts']}, "
             f"k={args.k}. One run; ratios within the run.", "",
             "| batch | method | tokens/s | speedup vs no-spec | same tokens as no-spec | tokens/step (incl. bonus) "
             "| accepted/step (τ) | drafter/target prefill |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r.get("acceptance")
        pr = "" if not a or a["prefill_ratio"] is None else (
            f"{a['drafter_prefill_tokens']:.0f}/{a['target_prefill_tokens']:.0f} ({100 * a['prefill_ratio']:.1f}%)")
        lines.append(f"| {r['batch']} | {r['method']} | {r['tokens_per_s']} | {r['speedup_vs_no_spec']:.2f}x | "
                     f"{r['same_output_as_no_spec']} | {a['tokens_per_step'] if a else 1.0} | "
                     f"{a['accepted_per_draft'] if a else 0} | {pr} |")
    lines += ["", f"Command: `{meta['command']}`"]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    plot(rows, Path(args.out + ".png"))
    print("\n".join(lines))
    return 0


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [next(r["tokens_per_s"] for r in rows if r["batch"] == b and r["method"] == m) for b in batches]
        ax.bar([i + j * w for i in range(len(batches))], vals, w, label=m)
    ax.set_xticks([i + w * (len(methods) - 1) / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("output tokens/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
