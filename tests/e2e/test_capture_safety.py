"""The drafter is CUDA-graph safe by construction, checked on the CPU (issue: vLLM captures the
drafter's graphs with their input addresses, piecewise in the V1 proposer and FULL in the V2
speculator; a graph replays whatever lies at the captured addresses, and Python state seen at
capture is frozen).

- every tensor entering the compiled region (HiViSDrafterModel.forward) is the proposer's
  persistent buffer (same address, every draft step, every proposal), never a fresh allocation;
- no Python attribute of the drafter changes while it drafts (nothing a graph could freeze);
- the step counter lives on the device and counts the forwards of one proposal;
- the drafter through vLLM's torch.compile path (no enforce_eager; the CPU build compiles with
  inductor) drafts exactly what the eager drafter drafts.
"""

import pytest
import torch

from .helpers import engine, hivis_spec, model_runner, prompt_set, token_ids

pytestmark = pytest.mark.e2e
K = 4


def _python_state(module: torch.nn.Module) -> dict:
    """Every plain (non-tensor, non-module) attribute of every submodule."""
    out = {}
    for name, m in module.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, (bool, int, float, str, type(None))):
                out[f"{name}.{k}"] = v
    return out


def test_compiled_region_reads_only_persistent_buffers(greedy):
    with engine(speculative_config=hivis_spec(k=K), max_num_seqs=4) as llm:
        drafter = model_runner(llm).drafter
        assert type(drafter).__name__ == "HiViSProposer"
        region = drafter.model.model  # HiViSDrafterModel: the @support_torch_compile region
        buffers = {"input_ids": drafter.input_ids, "positions": drafter.positions,
                   "hidden_states": drafter.hidden_states}
        calls = []

        forward = region.forward  # vLLM's compile decorator calls self.forward (module hooks do not fire)

        def record(*args, **kwargs):
            names = ("input_ids", "positions", "hidden_states", "draft_step")
            got = dict(zip(names, args)) | kwargs
            calls.append({n: (t.data_ptr(), tuple(t.shape)) for n, t in got.items() if isinstance(t, torch.Tensor)})
            calls[-1]["step"] = int(got["draft_step"][0]) if "draft_step" in got else None
            return forward(*args, **kwargs)

        before = _python_state(drafter.model)
        region.forward = record
        try:
            llm.generate(prompt_set()[:4], greedy, use_tqdm=False)
        finally:
            del region.forward
        after = _python_state(drafter.model)
        counter = getattr(drafter.model, "draft_step", None)
    assert len(calls) > 2 * K
    for i, c in enumerate(calls):
        for name, buf in buffers.items():
            assert c[name][0] == buf.data_ptr(), (f"call {i}: {name} is not the proposer's persistent buffer "
                                                  f"(step {c.get('step')})")
    for c in calls:
        assert "draft_step" in c and c["draft_step"][0] == counter.data_ptr(), "no device step counter"
    assert after == before, "Python state changed while drafting"
    # one proposal = the first pass (step 0) then K - 1 single-row steps: the counter says which
    steps = [c["step"] for c in calls]
    firsts = [i for i, s in enumerate(steps) if s == 0]
    assert firsts and all(steps[i:i + K] == list(range(K)) for i in firsts if i + K <= len(steps))


def test_compiled_drafter_drafts_like_the_eager_one(greedy):
    """vLLM's compile path (Dynamo + inductor on the CPU build) over the drafter with its device
    step counter: outputs and every acceptance counter equal the eager run's."""
    from vllm_hivis.serving.acceptance import from_llm_metrics

    prompts = prompt_set()[:6]
    runs = {}
    for eager in (True, False):
        with engine(speculative_config=hivis_spec(k=K), enforce_eager=eager) as llm:
            out = token_ids(llm.generate(prompts, greedy, use_tqdm=False))
            acc = from_llm_metrics(llm.get_metrics())
        runs[eager] = (out, acc.num_drafts, acc.num_accepted, acc.per_position_counts)
    assert runs[False] == runs[True]
    assert runs[True][2] > 0
