"""Every speculative method side by side on the tiny target, one run, the same prompts and images.

    python benchmarks/offline.py --out benchmarks/results/offline          # ~10 min on 2 CPU cores
    python benchmarks/offline.py --quick --out /tmp/offline                # CI: every code path, ~3 min
    python benchmarks/offline.py --target next --methods no-spec,ngram,hivis  # many image tokens (744 per scene)

Methods (one in-process vLLM engine each, `max_num_seqs` = the largest batch): no-spec, vLLM
``ngram``, vLLM ``eagle`` with an image-seeing drafter, the text-only drafter, hivis; plus the
ViSpec-style drafter through the offline replay evaluator (marked offline: it has no vLLM
proposer). The shipped baselines got the hivis drafter's data and step budget (their
provenance.json says what each got). Workloads (benchmarks/workloads.py): tiny-world
descriptions, tiny-world QA, scikit-image photographs. Greedy and T=1. "Batch b" submits the
prompts b at a time (b concurrent requests, as a client with b slots would).

Per (workload, temperature, batch, method): output tokens/s (median and range of `--reps`
repetitions on the same engine, after a warm-up)
and its ratio to no-spec, TPOT (median over requests, from vLLM's request timestamps),
acceptance in both conventions (tokens/step incl. the bonus token = vLLM's mean acceptance
length; τ = accepted drafts per step, the HiViS/ViSpec convention), per-position acceptance,
drafter and target prefill tokens, the share of wall time spent proposing drafts, and for greedy
whether the tokens equal no-spec's.

``--target next``: the trained tiny-world LLaVA-NeXT target (any-resolution tiles: 744 image tokens
per scene, 5x the LLaVA-1.5 target's 144) with its hivis drafter; ``--target qwen``: the trained
Qwen2.5-VL one (M-RoPE, 144 image tokens per scene). No image-seeing baselines exist for these
yet (methods no-spec, ngram, hivis); prompts go through each target's own chat template.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DESCRIBE, DraftTimer, med, meta, methods, pyplot, spread, write  # noqa: E402
from workloads import NAMES, workload  # noqa: E402

TOKENS = "vllm:generation_tokens"
PROMPT_TOKENS = "vllm:prompt_tokens"


def counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name and hasattr(m, "value"))


def run_once(llm, timer, prompts, sp, batch: int) -> dict:
    """Submit `prompts` `batch` at a time; wall time, outputs, TPOTs and counter deltas."""
    import time

    from vllm_hivis.serving.acceptance import from_llm_metrics

    before, prompt0, (d0, c0) = from_llm_metrics(llm.get_metrics()), counter(llm, PROMPT_TOKENS), timer.snapshot()
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i:i + batch], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    d1, c1 = timer.snapshot()
    tpot = [(o.metrics.last_token_ts - o.metrics.first_token_ts) / (o.metrics.num_generation_tokens - 1)
            for o in outs if o.metrics is not None and o.metrics.num_generation_tokens > 1]
    return {"wall": wall, "outputs": [list(o.outputs[0].token_ids) for o in outs],
            "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "tpot_ms": 1e3 * med(tpot),
            "acc": from_llm_metrics(llm.get_metrics()).minus(before), "prompt_tokens": counter(llm, PROMPT_TOKENS)
            - prompt0, "draft_s": d1 - d0, "draft_calls": c1 - c0}


def sampling(temp: float, max_tokens: int):
    from vllm import SamplingParams

    # T=1: one seed per request, so a repetition replays the same requests
    return SamplingParams(temperature=temp, max_tokens=max_tokens, seed=None if temp == 0 else 1234)


def sweep(args, **engine_kw) -> list[dict]:
    """One engine per method, each in a fresh process (as users run one method per server: an
    earlier engine in the same process can change a later one's speed - after vLLM's ngram
    proposer has imported numba, hivis drafted 1.6x slower on the CPU build); every (workload,
    temperature, batch, output length) cell `--reps` times."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cells: dict[tuple, list[dict]] = {}
    for name, spec in methods(args.k, args.methods, args.target):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            cells.update(pool.submit(sweep_method, args, name, spec, engine_kw).result())
    return summarise(cells, args)


def sweep_method(args, name: str, spec: dict | None, engine_kw: dict) -> dict[tuple, list[dict]]:
    """One method's cells, in this (fresh) process."""
    from transformers import AutoProcessor

    from hivis_testbed.engine import engine, model_runner
    from vllm_hivis.train.target import image_size

    target = target_dir(args.target)
    size = image_size(target)
    processor = None if args.target == "tiny" else AutoProcessor.from_pretrained(target, local_files_only=True)
    loads = {w: workload(w, args.n, size, processor) for w in args.workloads}
    temps, batches, lengths = [float(t) for t in args.temps], [int(b) for b in args.batches], args.lengths
    engine_kw = {"limit_mm_per_prompt": {"image": 1}, "model": target,
                 **({"max_model_len": 2048} if args.target != "tiny" else {}), **engine_kw}
    cells: dict[tuple, list[dict]] = {}
    with engine(speculative_config=spec, max_num_seqs=max(batches), **engine_kw) as llm:
        timer = DraftTimer(model_runner(llm))
        for w in args.workloads:  # warm-up: every workload once at the largest batch
            llm.generate(loads[w][:max(batches)], sampling(0.0, lengths[0]), use_tqdm=False)
        for rep in range(args.reps):
            for w in args.workloads:
                for t in temps:
                    for b in batches:
                        for n_out in lengths:
                            r = run_once(llm, timer, loads[w], sampling(t, n_out), b)
                            cells.setdefault((w, t, b, n_out, name), []).append(r)
                            print(f"rep {rep} {w:8s} T={t:g} batch {b} max_tokens {n_out} {name:8s} "
                                  f"{r['tokens'] / r['wall']:7.1f} tok/s", flush=True)
    return cells


def target_dir(kind: str) -> str:
    """The target of `--target`: the LLaVA-1.5 tiny target, or a variant's ("next", "qwen")."""
    from hivis_testbed import assets

    return assets.tiny_target() if kind == "tiny" else assets.variant(kind)[0]


def summarise(cells: dict, args) -> list[dict]:
    rows = []
    for (w, t, b, n_out, name), runs in cells.items():
        acc = runs[0]["acc"]
        for r in runs[1:]:
            acc = acc.plus(r["acc"])
        wall = sum(r["wall"] for r in runs)
        row = {"workload": w, "temperature": t, "batch": b, "max_tokens": n_out, "method": name, "reps": len(runs),
               "requests": args.n, "output_tokens": runs[0]["tokens"],
               "tokens_per_s": [round(r["tokens"] / r["wall"], 2) for r in runs],
               "tpot_ms": round(med([r["tpot_ms"] for r in runs]), 2),
               "drafting_share": round(sum(r["draft_s"] for r in runs) / wall, 4),
               "draft_ms_per_step": round(1e3 * sum(r["draft_s"] for r in runs)
                                          / max(1, sum(r["draft_calls"] for r in runs)), 3),
               "target_prefill_tokens": sum(r["prompt_tokens"] for r in runs) / len(runs),
               "outputs": runs[0]["outputs"],
               "outputs_stable": all(r["outputs"] == runs[0]["outputs"] for r in runs)}
        if name != "no-spec":
            s = acc.summary()
            row["acceptance"] = {k: s[k] for k in ("tokens_per_step", "accepted_per_draft", "per_position",
                                                   "draft_acceptance_rate")}
            # hivis counts its drafter's prefill; vLLM's EAGLE prefills every target row; ngram has none
            row["drafter_prefill_tokens"] = (acc.drafter_prefill_tokens / len(runs) if name in ("hivis", "text")
                                             else row["target_prefill_tokens"] if name == "eagle" else 0)
        rows.append(row)
    cell = lambda r: (r["workload"], r["temperature"], r["batch"], r["max_tokens"])  # noqa: E731
    base = {cell(r): r for r in rows if r["method"] == "no-spec"}
    for r in rows:
        b = base.get(cell(r))
        r["speedup_vs_no_spec"] = round(med(r["tokens_per_s"]) / med(b["tokens_per_s"]), 3) if b else None
        r["same_tokens_as_no_spec"] = (r["outputs"] == b["outputs"]) if b and r["temperature"] == 0 else None
    return rows


def offline_replay(args) -> list[dict]:
    """The ViSpec-style drafter (and hivis, for calibration) through the offline evaluator:
    acceptance only, greedy, in vLLM's counting convention."""
    from workloads import cases

    from hivis_testbed import assets
    from vllm_hivis.train.evaluate import evaluate
    from vllm_hivis.train.prompts import PromptItem
    from vllm_hivis.train.target import image_size

    target = target_dir(args.target)
    size = image_size(target)
    drafters = ((("vispec", assets.baseline("vispec")), ("hivis", assets.tiny_drafter())) if args.target == "tiny"
                else (("hivis", assets.variant(args.target)[1]),))
    rows = []
    for w in args.workloads:
        items = [PromptItem(f"{w}-{i}", q, imgs[0], w) for i, (q, imgs) in enumerate(cases(w, args.n, size))]
        for name, path in drafters:
            acc, _ = evaluate(target, path, items, args.k, args.max_tokens, progress=False)
            s = acc.summary()
            rows.append({"workload": w, "method": name, "offline": True, "tokens_per_step": s["tokens_per_step"],
                         "accepted_per_draft": s["accepted_per_draft"], "per_position": s["per_position"]})
            print(f"offline {w:8s} {name:8s} {s['tokens_per_step']:.2f} tokens/step", flush=True)
    return rows


TARGETS = {"tiny": "Tiny target (LLaVA-1.5, 144 image tokens)",
           "next": "Tiny LLaVA-NeXT target (744 image tokens per scene)",
           "qwen": "Tiny Qwen2.5-VL target (M-RoPE, 144 image tokens per scene)"}


def table(rows: list[dict], replay: list[dict], m: dict) -> list[str]:
    lines = [f"{TARGETS[m['target']]}, {m['machine']}, vLLM {m['vllm']} (V1 runner, fp32, eager), k={m['k']}, "
             f"{m['n']} prompts "
             f"per workload, up to {m['max_tokens']} tokens, {m['reps']} repetitions (tokens/s: median [range]). "
             "Ratios within this run only.", "",
             "| workload | T | batch | max tokens | method | tokens/s | vs no-spec | TPOT ms | tokens/step | τ "
             "| per position | drafter/target prefill | drafting share | draft ms/step | = no-spec |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r.get("acceptance")
        pp = " ".join(f"{x:.2f}" for x in a["per_position"]) if a else ""
        pre = (f"{r['drafter_prefill_tokens']:.0f}/{r['target_prefill_tokens']:.0f}" if a else
               f"-/{r['target_prefill_tokens']:.0f}")
        eq = {True: "yes", False: "**NO**", None: "n/a"}[r["same_tokens_as_no_spec"]]
        lines.append(f"| {r['workload']} | {r['temperature']:g} | {r['batch']} | {r['max_tokens']} | {r['method']} | "
                     f"{spread(r['tokens_per_s'])} | {r['speedup_vs_no_spec']:.2f}x | {r['tpot_ms']:.1f} | "
                     f"{a['tokens_per_step'] if a else 1.0:.2f} | {a['accepted_per_draft'] if a else 0:.2f} | {pp} | "
                     f"{pre} | {100 * r['drafting_share']:.1f}% | {r['draft_ms_per_step']:.2f} | {eq} |")
    if replay:
        lines += ["", "Offline replay (the evaluator: HF target, greedy, vLLM's counting convention; no speed):", "",
                  "| workload | drafter | tokens/step | τ | per position |", "|---|---|---|---|---|"]
        for r in replay:
            lines.append(f"| {r['workload']} | {r['method']} (offline) | {r['tokens_per_step']:.2f} | "
                         f"{r['accepted_per_draft']:.2f} | {' '.join(f'{x:.2f}' for x in r['per_position'])} |")
    lines += ["", "Methods: " + "; ".join(f"{k}: {v}" for k, v in DESCRIBE.items()) + "."]
    return lines


def plot(rows: list[dict], out: str) -> None:
    plt = pyplot()
    greedy = [r for r in rows if r["temperature"] == 0 and r["max_tokens"] == rows[0]["max_tokens"]]
    works = list(dict.fromkeys(r["workload"] for r in greedy))
    meths = list(dict.fromkeys(r["method"] for r in greedy))
    fig, axes = plt.subplots(1, len(works), figsize=(4 * len(works), 3.4), squeeze=False)
    for ax, w in zip(axes[0], works):
        for m in meths:
            pts = sorted((r["batch"], r["speedup_vs_no_spec"]) for r in greedy
                         if r["workload"] == w and r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_title(f"{w} (greedy)")
        ax.set_xlabel("batch")
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("speedup vs no-spec (tokens/s)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(works), figsize=(4 * len(works), 3.4), squeeze=False)
    b = min(r["batch"] for r in greedy)
    for ax, w in zip(axes[0], works):
        for r in greedy:
            if r["workload"] == w and r["batch"] == b and r.get("acceptance"):
                pp = r["acceptance"]["per_position"]
                ax.plot(range(1, len(pp) + 1), pp, marker="o", label=r["method"])
        ax.set_title(f"{w}: acceptance per position")
        ax.set_xlabel("draft position")
        ax.set_ylim(0, 1)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + "-per-position.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/offline")
    ap.add_argument("--target", default="tiny", choices=sorted(TARGETS),
                    help="tiny: the LLaVA-1.5 tiny target; next: the LLaVA-NeXT one (744 image tokens per scene); "
                         "qwen: the Qwen2.5-VL one (M-RoPE)")
    ap.add_argument("--methods", default=None,
                    help="default: no-spec,ngram,eagle,text,hivis (next: no-spec,ngram,hivis)")
    ap.add_argument("--workloads", default=",".join(NAMES))
    ap.add_argument("--temps", default="0,1", help="sampling temperatures (0 = greedy)")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--n", type=int, default=8, help="prompts per workload")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--lengths", help="comma list of output lengths (max_tokens) to sweep; default --max-tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--no-replay", action="store_true", help="skip the offline ViSpec-style replay")
    ap.add_argument("--quick", action="store_true", help="CI: tiny sizes, every method and code path")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.max_tokens, args.reps, args.batches = 2, 24, 1, "1,2"
    args.methods = (args.methods or ("no-spec,ngram,eagle,text,hivis" if args.target == "tiny"
                                     else "no-spec,ngram,hivis")).split(",")
    args.workloads = args.workloads.split(",")
    args.temps, args.batches = args.temps.split(","), args.batches.split(",")
    args.lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [args.max_tokens]
    if "no-spec" not in args.methods:
        raise SystemExit("error: --methods must include no-spec (every ratio is to it)")
    rows = sweep(args)
    replay = [] if args.no_replay else offline_replay(args)
    m = meta(argv, "offline.py", target=args.target, k=args.k, n=args.n, max_tokens=args.max_tokens, reps=args.reps)
    lines = table(rows, replay, m)
    write(args.out, m, [{k: v for k, v in r.items() if k != "outputs"} for r in rows] + replay, lines)
    plot(rows, args.out)
    print("\n".join(lines))
    bad = [r for r in rows if r["same_tokens_as_no_spec"] is False]
    if bad:
        print("LOSSLESSNESS VIOLATED: " + ", ".join(f"{r['method']} {r['workload']} batch {r['batch']}" for r in bad))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
