"""Shared pieces of the end-to-end tests: engines, prompt sets, the reference target."""

import contextlib
import gc
import json
import os
from pathlib import Path

from hivis_testbed import assets
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


@contextlib.contextmanager
def engine(in_process=True, env=None, **kw):
    """A vLLM engine on the tiny target (in-process by default: 4-8 s to start)."""
    from vllm import LLM

    old = {k: os.environ.get(k) for k in ["VLLM_ENABLE_V1_MULTIPROCESSING", *(env or {})]}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    os.environ.update(env or {})
    args = dict(model=assets.tiny_target(), dtype="float32", max_model_len=512, enforce_eager=True,
                gpu_memory_utilization=0.25, limit_mm_per_prompt={"image": 2}, disable_log_stats=False, seed=0)
    args.update(kw)
    llm = LLM(**args)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def model_runner(llm):
    """The V1 model runner of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner


def transformers_greedy(questions, images, max_new_tokens=128):
    """The tiny target's greedy answers in transformers (the reference for server outputs)."""
    from transformers import AutoTokenizer

    from hivis_testbed.tinyworld.evaluate import greedy
    from vllm_hivis.train.target import HFTarget

    model = HFTarget(assets.tiny_target()).hf
    return greedy(model, AutoTokenizer.from_pretrained(assets.tiny_target()), questions, images,
                  max_new_tokens=max_new_tokens)
