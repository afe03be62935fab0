"""Where a hivis drafting step's time goes, in the engine (no profiler): wall time per step of the
proposer's propose(), its first-pass input building (the plan and the compaction) and the drafter
attention's forward (all passes), on greedy tiny-world descriptions at batch 1.

    python benchmarks/step_parts.py            # ~1 min on 2 CPU cores; prints one JSON line

The timers wrap the methods by monkeypatching the classes before the engine starts (in-process
engine): they add a few microseconds per call, the same for every part.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import workload  # noqa: E402


def main() -> int:
    from vllm import SamplingParams

    from hivis_testbed import assets
    from hivis_testbed.engine import engine, model_runner
    from vllm_hivis.serving import draft_attention, proposer
    from vllm_hivis.train.target import image_size

    spent: dict[str, float] = {}
    parts = ((proposer.HiViSProposer, "propose"), (proposer.HiViSProposer, "set_inputs_first_pass"),
             (proposer.HiViSProposer, "_plan"), (proposer.HiViSProposer, "_compact"),
             (draft_attention.HiViSDraftAttentionImpl, "forward"))
    def timer(orig, name):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return timed

    for cls, name in parts:
        setattr(cls, name, timer(getattr(cls, name), name))
    prompts = workload("describe", 8, image_size(assets.tiny_target()))
    sp = SamplingParams(temperature=0.0, max_tokens=96)
    spec = {"method": "hivis", "model": assets.tiny_drafter(), "num_speculative_tokens": 5}
    with engine(speculative_config=spec, max_num_seqs=4, limit_mm_per_prompt={"image": 1}) as llm:
        runner = model_runner(llm)
        llm.generate(prompts[:4], sp, use_tqdm=False)  # warm-up
        spent.clear()
        steps = [0]
        orig = runner.propose_draft_token_ids

        def counted(*a, **k):
            steps[0] += 1
            return orig(*a, **k)

        runner.propose_draft_token_ids = counted
        for p in prompts:
            llm.generate([p], sp, use_tqdm=False)
    names = {"propose": "propose", "set_inputs_first_pass": "first-pass inputs (incl. plan, compaction)",
             "_plan": "plan", "_compact": "compaction", "forward": "drafter attention (all passes)"}
    print(json.dumps({"steps": steps[0], "ms_per_step": {names[k]: round(1e3 * v / steps[0], 3)
                                                         for k, v in spent.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
