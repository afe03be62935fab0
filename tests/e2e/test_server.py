"""`vllm serve` + the OpenAI client: stock vLLM serves the tiny target, and hivis serves it
losslessly, streaming included; bad input gets a clear error and the server keeps serving."""

import concurrent.futures
import json
import subprocess
import urllib.request

import openai
import pytest

from hivis_testbed import assets
from hivis_testbed.demo import chat
from hivis_testbed.server import CPU_DEFAULTS, VLLMServer, vllm_executable
from hivis_testbed.tinyworld.dataset import sample
from vllm_hivis.serving.acceptance import from_prometheus_text

from .helpers import hivis_spec, image_size, transformers_greedy

pytestmark = pytest.mark.e2e


def scenes(n=3):
    return [sample("test", 500 + i, image_size(), kind="describe") for i in range(n)]


def ask_all(url, min_chunks=6):
    """Non-streamed and streamed answers to a few image requests. Stock vLLM streams a chunk per
    token; with speculative decoding a chunk holds a whole verified step (up to k+1 tokens)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    answers, streamed = [], []
    for s in scenes():
        answers.append(chat(client, model, s.image, s.qa.question).choices[0].message.content)
        parts = [c.choices[0].delta.content for c in chat(client, model, s.image, s.qa.question, stream=True)
                 if c.choices and c.choices[0].delta.content]
        assert len(parts) >= min_chunks, parts  # really streamed, not one final chunk
        streamed.append("".join(parts))
    return client, model, answers, streamed


@pytest.fixture(scope="module")
def stock_answers():
    with VLLMServer(assets.tiny_target()) as srv:
        _, _, answers, streamed = ask_all(srv.url)
    return answers, streamed


def test_stock_vllm_serves_the_tiny_target(stock_answers):
    """Through the server, the tiny target answers exactly what transformers answers."""
    answers, streamed = stock_answers
    assert answers == streamed
    ref = transformers_greedy([s.qa.question for s in scenes()], [s.image for s in scenes()])
    assert [a.strip() for a in answers] == ref


def test_stock_vllm_offline_equals_transformers():
    """`vllm.LLM(model=assets.tiny_target())` greedy == transformers greedy, image and text-only."""
    from vllm import SamplingParams

    from .helpers import engine, text_prompt

    ss = [sample("test", 600 + i, image_size(), kind=k) for i, k in enumerate(("describe", "count", "where"))]
    prompts = [{"prompt": text_prompt(s.qa.question), "multi_modal_data": {"image": s.image}} for s in ss]
    with engine() as llm:
        out = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=128), use_tqdm=False)
    assert [o.outputs[0].text.strip() for o in out] == transformers_greedy([s.qa.question for s in ss],
                                                                         [s.image for s in ss])


def test_hivis_server(stock_answers):
    spec = json.dumps(hivis_spec(k=5))
    with VLLMServer(assets.tiny_target(), ["--speculative-config", spec]) as srv:
        client, model, answers, streamed = ask_all(srv.url, min_chunks=2)
        assert answers == stock_answers[0] and streamed == stock_answers[1]  # lossless online
        # concurrent requests, one of them invalid: a clear 400, the others are served
        bad = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                           {"type": "text", "text": "Describe the image in detail."}]}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            good = [pool.submit(lambda s=s: chat(client, model, s.image, s.qa.question)) for s in scenes()]
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model=model, messages=[bad], max_tokens=8)
            assert [f.result().choices[0].message.content for f in good] == stock_answers[0]
        with urllib.request.urlopen(srv.url + "/health", timeout=5) as r:
            assert r.status == 200
        acc = from_prometheus_text(srv.metrics())
        assert acc.num_drafts > 0 and acc.accepted_per_draft > 1.0
        assert 0 < acc.prefill_ratio < 0.5  # the drafter prefilled the text tokens only
        assert "vllm:spec_decode_num_accepted_tokens_per_pos_total" in srv.metrics()


def test_vllm_serve_rejects_a_bad_hivis_config(tmp_path):
    cmd = [vllm_executable(), "serve", assets.tiny_target(), *CPU_DEFAULTS, "--speculative-config",
           json.dumps({"method": "hivis", "model": str(tmp_path / "missing"), "num_speculative_tokens": 3})]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "hivis drafter directory" in r.stdout + r.stderr and "does not exist" in r.stdout + r.stderr


def test_demo_runs_end_to_end():
    """The README's main job: `hivis-testbed demo` serves, queries and reports acceptance."""
    import sys

    r = subprocess.run([sys.executable, "-m", "hivis_testbed", "demo"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "ASSISTANT: There " in out and "(truth:" in out and "ASSISTANT (streamed):" in out
    assert "acceptance length:" in out and "drafter prefill:" in out
