"""One hivis drafting step against one vLLM EAGLE drafting step, with the same drafter weights.

    python benchmarks/profile_step.py --out benchmarks/results/profile_step     # ~3 min on 2 CPU cores

The EAGLE head is the shipped hivis drafter's own layer (fc, decoder layer; its step biases
dropped) exported in vLLM's EAGLE format, so both methods run the same matmuls and what differs
is exactly hivis's machinery: its per-step planning (the drop rule over the batch), its
compaction of the drafter inputs, and its attention backend (KV at translated target slots),
against EAGLE reading every target row. Greedy tiny-world descriptions at batch 1 and 4, engines
alternating `--reps` times; per method: drafting ms per step (the model runner's
propose_draft_token_ids, wall), drafting share of wall time, tokens/s, tokens/step, and the
functions that take the drafting time (cProfile, by own time). Writes .json and .md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import med, meta, spread, write  # noqa: E402
from workloads import workload  # noqa: E402


def eagle_twin(out_dir: str) -> str:
    """The shipped hivis drafter's weights as a vLLM EAGLE head (step biases dropped)."""
    from hivis_testbed import assets
    from vllm_hivis.train.baselines import export_eagle
    from vllm_hivis.train.drafters import HiViSDrafter

    d = HiViSDrafter.from_pretrained(assets.tiny_drafter())
    d.step_bias = None
    return str(export_eagle(d, out_dir))


def same_weight_specs(k: int) -> dict[str, dict]:
    """The two speculative configs compared: the shipped hivis drafter, and its twin as vLLM EAGLE."""
    from hivis_testbed import assets

    twin = eagle_twin(tempfile.mkdtemp(prefix="eagle-twin-"))
    return {"hivis": {"method": "hivis", "model": assets.tiny_drafter(), "num_speculative_tokens": k},
            "eagle (same weights)": {"method": "eagle", "model": twin, "num_speculative_tokens": k}}


def profiled(llm, prompts, sp, batch: int, top: int) -> dict:
    from hivis_testbed.engine import model_runner

    runner = model_runner(llm)
    prof, spent = cProfile.Profile(), [0.0, 0]
    orig = runner.propose_draft_token_ids

    def timed(*a, **k):
        t0 = time.perf_counter()
        prof.enable()
        try:
            return orig(*a, **k)
        finally:
            prof.disable()
            spent[0] += time.perf_counter() - t0
            spent[1] += 1

    runner.propose_draft_token_ids = timed
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i:i + batch], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    runner.propose_draft_token_ids = orig
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    body = s.getvalue()
    body = body[body.find("ncalls"):] if "ncalls" in body else body
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall": wall, "draft_s": spent[0], "steps": spent[1], "tokens": tokens, "profile": body.rstrip(),
            "outputs": [list(o.outputs[0].token_ids) for o in outs]}


def main(argv=None) -> int:
    from vllm import SamplingParams

    from hivis_testbed import assets
    from hivis_testbed.engine import engine
    from vllm_hivis.serving.acceptance import from_llm_metrics
    from vllm_hivis.train.target import image_size

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/profile_step")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="functions listed per profile")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.batches, args.max_tokens, args.reps = 2, "1", 24, 1
    size = image_size(assets.tiny_target())
    prompts = workload("describe", args.n, size)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    batches = [int(b) for b in args.batches.split(",")]
    specs = same_weight_specs(args.k)
    cells: dict[tuple, list[dict]] = {}
    for rep in range(args.reps):
        for name, spec in specs.items():
            with engine(speculative_config=spec, max_num_seqs=max(batches), limit_mm_per_prompt={"image": 1}) as llm:
                llm.generate(prompts[:max(batches)], sp, use_tqdm=False)  # warm-up
                for b in batches:
                    before = from_llm_metrics(llm.get_metrics())
                    r = profiled(llm, prompts, sp, b, args.top)
                    r["acc"] = from_llm_metrics(llm.get_metrics()).minus(before).summary()
                    cells.setdefault((name, b), []).append(r)
                    print(f"rep {rep} {name:22s} batch {b}: {1e3 * r['draft_s'] / r['steps']:.2f} ms/step, "
                          f"{r['tokens'] / r['wall']:.1f} tok/s", flush=True)
    rows = []
    for (name, b), runs in cells.items():
        rows.append({"method": name, "batch": b, "reps": len(runs),
                     "draft_ms_per_step": [round(1e3 * r["draft_s"] / r["steps"], 3) for r in runs],
                     "drafting_share": round(sum(r["draft_s"] for r in runs) / sum(r["wall"] for r in runs), 4),
                     "tokens_per_s": [round(r["tokens"] / r["wall"], 2) for r in runs],
                     "tokens_per_step": runs[0]["acc"]["tokens_per_step"], "profile": runs[-1]["profile"]})
    m = meta(argv, "profile_step.py", k=args.k, n=args.n, max_tokens=args.max_tokens, reps=args.reps)
    lines = [f"hivis vs vLLM EAGLE with the same drafter weights, tiny target, {m['machine']}, vLLM {m['vllm']}, "
             f"greedy descriptions, {args.n} prompts, k={args.k}, {args.reps} alternating repetitions "
             "(median [range]).", "",
             "| batch | method | drafting ms/step | drafting share | tokens/s | tokens/step |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["batch"], r["method"])):
        lines.append(f"| {r['batch']} | {r['method']} | {spread(r['draft_ms_per_step'])} | "
                     f"{100 * r['drafting_share']:.1f}% | {spread(r['tokens_per_s'])} | {r['tokens_per_step']:.2f} |")
    for b in batches:
        h = next(r for r in rows if r["method"] == "hivis" and r["batch"] == b)
        e = next(r for r in rows if r["method"] != "hivis" and r["batch"] == b)
        lines.append(f"\nBatch {b}: hivis / EAGLE drafting time per step "
                     f"{med(h['draft_ms_per_step']) / med(e['draft_ms_per_step']):.2f}x.")
    for r in rows:
        lines += ["", f"Profile of the drafting, {r['method']}, batch {r['batch']} (own time, top {args.top}):", "",
                  "```", r["profile"], "```"]
    write(args.out, m, rows, lines)
    print("\n".join(lines[: 6 + len(rows) + len(batches)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
