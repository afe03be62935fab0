"""Shared pieces of the end-to-end tests: engines, prompt sets, the reference target."""

import json
from pathlib import Path

import numpy as np

from hivis_testbed import assets
from hivis_testbed.engine import engine, model_runner  # noqa: F401  (re-exported to the tests)
from hivis_testbed.tinyworld.build import prompt_text
from hivis_testbed.tinyworld.dataset import sample


def image_size(model_dir=None) -> int:
    cfg = json.loads((Path(model_dir or assets.tiny_target()) / "config.json").read_text())
    return int(cfg["vision_config"]["image_size"])


def text_prompt(question, n_images=1):
    """The chat-template prompt string (BOS included) with n image placeholders."""
    head = "<s>" + prompt_text(question, with_image=n_images > 0)
    if n_images > 1:
        head = head.replace("<image>\n", "<image>\n" * n_images, 1)
    return head


def prompt_set(split="test", start=0, n_describe=6):
    """Mixed requests: long descriptions, every QA kind, a text-only and a two-image prompt."""
    size = image_size()
    out = []
    for i in range(n_describe):
        s = sample(split, start + i, size, kind="describe")
        out.append({"prompt": text_prompt(s.qa.question), "multi_modal_data": {"image": s.image}})
    for j, kind in enumerate(("count", "colour", "where", "cell", "yesno")):
        s = sample(split, start + 100 + j, size, kind=kind)
        out.append({"prompt": text_prompt(s.qa.question), "multi_modal_data": {"image": s.image}})
    out.append({"prompt": text_prompt("How many shapes are there?", n_images=0)})
    a, b = sample(split, start + 200, size), sample(split, start + 201, size)
    out.append({"prompt": text_prompt("Describe the image in detail.", n_images=2),
                "multi_modal_data": {"image": [a.image, b.image]}})
    return out


def hivis_spec(k=3, drafter=None, **kw):
    return {"method": "hivis", "model": drafter or assets.tiny_drafter(), "num_speculative_tokens": k, **kw}


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def transformers_greedy(questions, images, max_new_tokens=128):
    """The tiny target's greedy answers in transformers (the reference for server outputs)."""
    from transformers import AutoTokenizer

    from hivis_testbed.tinyworld.evaluate import greedy
    from vllm_hivis.train.target import HFTarget

    model = HFTarget(assets.tiny_target()).hf
    return greedy(model, AutoTokenizer.from_pretrained(assets.tiny_target()), questions, images,
                  max_new_tokens=max_new_tokens)


def check_lossless_under_preemption(target, drafter, prompts, max_model_len, **engine_kw):
    """hivis (k=3) with a KV cache of one max_model_len plus the draft lookahead (block size 32,
    the CPU build's) against no-spec, for prompts that all run to 96 tokens: requests must be
    preempted and resumed, and the answers stay the target's own."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    kw = dict(model=target, max_model_len=max_model_len, max_num_seqs=8, **engine_kw)
    with engine(**kw) as llm:
        ref = llm.generate(prompts, sp, use_tqdm=False)
    spec = {"method": "hivis", "model": drafter, "num_speculative_tokens": 3}
    with engine(speculative_config=spec, block_size=32, num_gpu_blocks_override=max_model_len // 32 + 1, **kw) as llm:
        out = llm.generate(prompts, sp, use_tqdm=False)
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert token_ids(out) == token_ids(ref)
    assert preemptions > 0


def traced_rows(traces, request_id):
    """All first-pass rows vLLM's drafter ran for one request: a dict per field. (The engine's
    internal request ids are the user's id plus a random suffix: '0' -> '0-960f2ecb'.)"""
    rows = {k: [] for k in ("target_pos", "drafter_pos", "input_ids", "features", "out_features", "is_dummy")}
    for t in traces:
        ids = [str(r).rsplit("-", 1)[0] for r in t["req_ids"]]
        if request_id not in ids:
            continue
        sel = t["req_of_row"] == ids.index(request_id)
        for k in rows:
            rows[k].append(t[k][sel])
    return {k: np.concatenate(v) for k, v in rows.items()}


def pipeline_items():
    """Two image prompts of different aspect ratios and a text-only one (any-size towers)."""
    from PIL import Image

    from vllm_hivis.train.prompts import PromptItem

    return [PromptItem(id="0", question="Describe the image in detail.", image=Image.new("RGB", (200, 90), "red")),
            PromptItem(id="1", question="How many shapes are there?", image=Image.new("RGB", (60, 150), "green")),
            PromptItem(id="2", question="What colour is the background?")]


def check_training_pipeline_matches_serving(target, drafter, items, trace_dir, **engine_kw):
    """The training side against vLLM on one target: the offline evaluator generates vLLM's greedy
    tokens and counts acceptance exactly as vLLM does (k=3); training tokenises prompts as vLLM
    does; and the hidden states data generation records (transformers' forward) equal the ones
    vLLM hands the drafter, row for row."""
    import torch
    from vllm import SamplingParams

    from vllm_hivis.serving.acceptance import from_llm_metrics
    from vllm_hivis.serving.trace import load_traces
    from vllm_hivis.train.evaluate import evaluate
    from vllm_hivis.train.target import HFTarget

    acc_off, gen = evaluate(target, drafter, items, k=3, max_tokens=24, progress=False)
    hf = HFTarget(target)
    reqs = [{"prompt": it.chat_text(hf.processor), **({"multi_modal_data": {"image": it.image}} if it.image else {})}
            for it in items]
    spec = {"method": "hivis", "model": drafter, "num_speculative_tokens": 3}
    with engine(model=target, max_model_len=1024, speculative_config=spec,
                env={"VLLM_HIVIS_TRACE_DIR": str(trace_dir)}, **engine_kw) as llm:
        outs = llm.generate(reqs, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
        acc = from_llm_metrics(llm.get_metrics())
    assert gen == token_ids(outs)
    assert (acc_off.num_drafts, acc_off.num_draft_tokens, acc_off.num_accepted) == \
        (acc.num_drafts, acc.num_draft_tokens, acc.num_accepted)
    traces, checked = load_traces(trace_dir), 0
    for it, o in zip(items, outs):
        ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        assert hf.encode(it)[0].tolist() == list(o.prompt_token_ids)  # vLLM and training tokenise alike
        hidden, _, _ = hf.hidden_states(torch.tensor(ids), it.image)
        tr = traced_rows(traces, o.request_id)
        for j in np.flatnonzero(~tr["is_dummy"].astype(bool)):
            p = int(tr["target_pos"][j])
            if p < len(ids) - 1 and int(tr["input_ids"][j]) == ids[p + 1]:
                np.testing.assert_allclose(tr["features"][j], hidden[p].numpy(), atol=2e-4, rtol=1e-3)
                checked += 1
    assert checked > 40


def exact_prefix_probs(target_dir, prompt, prefixes):
    """P(prefix) under the target at T=1, by teacher forcing in transformers (fp32, HFTarget: the
    training side's forward, so Qwen2.5-VL gets its placeholder marks). `prompt` is a one-image
    vLLM prompt; `prefixes` a set of generated token tuples."""
    import torch

    from vllm_hivis.train.target import HFTarget

    hf = HFTarget(target_dir)
    image = prompt["multi_modal_data"]["image"]
    ids = hf.processor(images=image, text=prompt["prompt"], return_tensors="pt",
                       add_special_tokens=False)["input_ids"][0]  # [L] placeholders expanded
    L, out = len(ids), {}
    with torch.no_grad():
        for pre in prefixes:
            h, _, _ = hf.hidden_states(torch.cat([ids, torch.tensor(pre)]), image)  # [L + len(pre), H]
            logp = hf.hf.lm_head(h[L - 1:]).float().log_softmax(-1)
            out[pre] = float(np.exp(sum(float(logp[i, t]) for i, t in enumerate(pre))))
    return out


def check_matches_distribution(runs, probs, n, label=""):
    """Chi-square goodness of fit of each run's samples (n token tuples per run name) against the
    exact prefix probabilities; prefixes expected fewer than 10 times and unseen ones share one
    "other" bin whose expected count is the remaining mass."""
    from scipy.stats import chisquare

    assert sum(probs.values()) > 0.95  # the observed prefixes carry nearly all the mass
    common = [k for k, q in sorted(probs.items(), key=lambda kv: -kv[1]) if q * n >= 10]
    assert len(common) >= 4, "the test needs an uncertain prompt"
    for name, samples in runs.items():
        assert len(samples) == n
        obs = [sum(s == k for s in samples) for k in common]
        obs.append(n - sum(obs))
        exp = [probs[k] * n for k in common]
        exp.append(n - sum(exp))
        stat, pval = chisquare(obs, exp)
        print(f"\n{label}{name}: chi2={stat:.1f} p={pval:.3f} over {len(common)} prefixes")
        assert pval > 1e-3, (name, obs, exp)
