"""Where a drafting step's time goes, hivis against vLLM's EAGLE with the same drafter weights, in
the engine (no profiler): wall time per step of the proposer's propose(), its first-pass input
building (EAGLE's, plus hivis's plan and compaction), the drafter's forward passes and its
attention layer (all passes), on greedy tiny-world descriptions.

    python benchmarks/step_parts.py                      # ~2 min on 2 CPU cores
    python benchmarks/step_parts.py --out benchmarks/results/step_parts

The EAGLE head is profile_step.py's twin (the shipped hivis drafter's layer in vLLM's EAGLE format,
step biases dropped), so the two run the same matmuls and what differs is hivis's machinery. The
timers wrap the methods by monkeypatching the classes before the engines start (in-process
engine): they add a few microseconds per call, the same for both methods. Engines alternate
`--reps` times; medians [range] per part.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import med, meta, spread, write  # noqa: E402
from profile_step import same_weight_specs  # noqa: E402
from workloads import workload  # noqa: E402

PARTS = {"propose": "propose (all of drafting)", "set_inputs_first_pass": "first-pass inputs",
         "_plan": "  hivis plan", "_compact": "  hivis compaction", "model": "drafter forwards (5 passes)",
         "attention": "  its attention layer"}


def install_timers(spent: dict[str, float]) -> None:
    """Wrap the parts of both methods' drafting; attention counts only inside propose()."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    from vllm_hivis.serving import draft_attention, drafter, proposer

    inside = [False]

    def timer(orig, name, gated=False):
        def timed(*a, **k):
            if gated and not inside[0]:
                return orig(*a, **k)
            t0 = time.perf_counter()
            if name == "propose":
                inside[0] = True
            try:
                return orig(*a, **k)
            finally:
                if name == "propose":
                    inside[0] = False
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return timed

    SpecDecodeBaseProposer.propose = timer(SpecDecodeBaseProposer.propose, "propose")
    SpecDecodeBaseProposer.set_inputs_first_pass = timer(SpecDecodeBaseProposer.set_inputs_first_pass,
                                                         "set_inputs_first_pass")
    # hivis's overrides call the base methods: time the outermost call only
    proposer.HiViSProposer.propose = timer(proposer.HiViSProposer.propose, "propose_hivis")
    proposer.HiViSProposer._plan = timer(proposer.HiViSProposer._plan, "_plan")
    proposer.HiViSProposer._compact = timer(proposer.HiViSProposer._compact, "_compact")
    proposer.HiViSProposer.set_inputs_first_pass = timer(proposer.HiViSProposer.set_inputs_first_pass,
                                                         "set_inputs_first_pass_hivis")
    draft_attention.HiViSDraftAttentionImpl.forward = timer(draft_attention.HiViSDraftAttentionImpl.forward,
                                                            "attention", gated=True)
    CPUAttentionBackendImpl.forward = timer(CPUAttentionBackendImpl.forward, "attention", gated=True)
    drafter.HiViSDrafterForCausalLM.forward = timer(drafter.HiViSDrafterForCausalLM.forward, "model", gated=True)
    from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM
    EagleLlamaForCausalLM.forward = timer(EagleLlamaForCausalLM.forward, "model", gated=True)


def main(argv=None) -> int:
    from vllm import SamplingParams

    from hivis_testbed import assets
    from hivis_testbed.engine import engine, model_runner
    from vllm_hivis.train.target import image_size

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write <out>.json / <out>.md")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.max_tokens, args.reps = 2, 24, 1
    spent: dict[str, float] = {}
    install_timers(spent)
    prompts = workload("describe", args.n, image_size(assets.tiny_target()))
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    specs = same_weight_specs(args.k)
    cells: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        for name, spec in specs.items():
            with engine(speculative_config=spec, max_num_seqs=max(4, args.batch),
                        limit_mm_per_prompt={"image": 1}) as llm:
                runner = model_runner(llm)
                llm.generate(prompts[:4], sp, use_tqdm=False)  # warm-up
                spent.clear()
                steps = [0]
                orig = runner.propose_draft_token_ids

                def counted(*a, _orig=orig, _steps=steps, **k):
                    _steps[0] += 1
                    return _orig(*a, **k)

                runner.propose_draft_token_ids = counted
                t0 = time.perf_counter()
                for i in range(0, len(prompts), args.batch):
                    llm.generate(prompts[i:i + args.batch], sp, use_tqdm=False)
                wall = time.perf_counter() - t0
                runner.propose_draft_token_ids = orig
                ms = {k: 1e3 * v / steps[0] for k, v in spent.items()}
                # hivis's wrappers sit outside the base ones: its totals are the outer timers
                for outer in ("propose", "set_inputs_first_pass"):
                    if f"{outer}_hivis" in ms:
                        ms[outer] = ms.pop(f"{outer}_hivis")
                ms["step"] = 1e3 * wall / steps[0]
                cells.setdefault(name, []).append(ms)
                print(f"rep {rep} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()), flush=True)
    rows = [{"method": name, "reps": len(runs),
             "ms_per_step": {p: [round(r.get(p, 0.0), 3) for r in runs] for p in [*PARTS, "step"]}}
            for name, runs in cells.items()]
    m = meta(argv, "step_parts.py", k=args.k, n=args.n, batch=args.batch, max_tokens=args.max_tokens, reps=args.reps)
    lines = [f"Drafting time per step by part, ms (median [range] of {args.reps} alternating engines), batch "
             f"{args.batch}, greedy descriptions, {args.n} prompts, k={args.k}, {m['machine']}, vLLM {m['vllm']}.", "",
             "| part | " + " | ".join(r["method"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for p, label in [*PARTS.items(), ("step", "whole engine step (wall)")]:
        lines.append(f"| {label} | " + " | ".join(spread(r["ms_per_step"][p], 2) for r in rows) + " |")
    h, e = (next(r for r in rows if r["method"].startswith(x)) for x in ("hivis", "eagle"))
    lines.append(f"\nhivis / EAGLE drafting time per step: "
                 f"{med(h['ms_per_step']['propose']) / med(e['ms_per_step']['propose']):.2f}x.")
    if args.out:
        write(args.out, m, rows, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
