"""Soak: many concurrent mixed requests against a hivis server with a KV cache small enough to force
preemption, for a bounded time: zero errors, zero divergences from no-spec greedy answers, and no
memory growth trend.

    python benchmarks/soak.py --seconds 600 --concurrency 64            # the full soak
    python benchmarks/soak.py --seconds 25 --concurrency 64 --quick     # CI's short form (tests/e2e)

Requests (drawn at random by each of `concurrency` clients, in a loop until the time is up): one of
8 held-out scene descriptions, 4 text-only questions or 4 two-image prompts; greedy or sampled
(T=1); streamed or not. Greedy answers must equal vLLM's own no-spec answers (offline
``LLM.chat``, computed first); sampled ones must complete. The server runs with
``--num-gpu-blocks-override`` small (preemptions are counted from /metrics), and the resident
memory of its whole process tree is sampled every second; the trend is the slope of a least-squares
fit over the second half of the run (after warm-up). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENS = 48


def workload(image_size: int):
    from hivis_testbed.demo import image_data_url
    from hivis_testbed.tinyworld.dataset import sample

    def content(images, text):
        return [*({"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images),
                {"type": "text", "text": text}]

    out = []
    for i in range(8):
        s = sample("test", 900 + i, image_size, kind="describe")
        out.append(("image", [{"role": "user", "content": content([s.image], s.qa.question)}]))
    for q in ("How many shapes are there?", "What colour is the background?", "Is there a red circle?",
              "Where is the blue square?"):
        out.append(("text-only", [{"role": "user", "content": q}]))
    for i in range(4):
        a, b = sample("test", 950 + 2 * i, image_size), sample("test", 951 + 2 * i, image_size)
        out.append(("two images", [{"role": "user", "content": content([a.image, b.image],
                                                                        "Describe the image in detail.")}]))
    return out


def reference_answers(target: str, prompts) -> list[str]:
    """vLLM's own no-spec greedy answers (offline chat: the server's template and processing)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=target, dtype="float32", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.25,
              limit_mm_per_prompt={"image": 2}, seed=0)
    outs = llm.chat([m for _, m in prompts], SamplingParams(temperature=0.0, max_tokens=TOKENS), use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    return [o.outputs[0].text for o in outs]


class MemorySampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.root, self.samples, self.stop = psutil.Process(pid), [], threading.Event()

    def run(self):
        import psutil

        t0 = time.monotonic()
        while not self.stop.wait(1.0):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
            except psutil.Error:
                continue
            self.samples.append((time.monotonic() - t0, rss / 2**20))

    def trend_mb_per_min(self) -> float:
        half = self.samples[len(self.samples) // 2:]
        if len(half) < 3:
            return 0.0
        n = len(half)
        mt, mr = sum(t for t, _ in half) / n, sum(r for _, r in half) / n
        var = sum((t - mt) ** 2 for t, _ in half)
        return 60 * sum((t - mt) * (r - mr) for t, r in half) / var if var else 0.0


async def client(oai, model, prompts, refs, deadline, rng, stats):
    while time.monotonic() < deadline:
        i = rng.randrange(len(prompts))
        kind, messages = prompts[i]
        greedy, stream = rng.random() < 0.6, rng.random() < 0.5
        args = dict(model=model, messages=messages, max_tokens=TOKENS, temperature=0.0 if greedy else 1.0)
        try:
            if stream:
                text = ""
                async for chunk in await oai.chat.completions.create(stream=True, **args):
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
            else:
                text = (await oai.chat.completions.create(**args)).choices[0].message.content
        except Exception as e:  # every error is a soak failure
            stats["errors"].append(f"{kind} greedy={greedy} stream={stream}: {type(e).__name__}: {e}")
            continue
        stats["requests"] += 1
        stats["by_kind"][kind] = stats["by_kind"].get(kind, 0) + 1
        if greedy:
            stats["greedy"] += 1
            if text != refs[i]:
                stats["divergences"].append({"kind": kind, "stream": stream, "got": text, "want": refs[i]})


async def drive(url, model, prompts, refs, seconds, concurrency, seed):
    import openai

    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0)
    stats = {"requests": 0, "greedy": 0, "errors": [], "divergences": [], "by_kind": {}}
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client(oai, model, prompts, refs, deadline, random.Random(seed + c), stats)
                           for c in range(concurrency)))
    await oai.close()
    return stats


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=40, help="KV cache blocks of 32 tokens (small: preemption)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--method", choices=("hivis", "no-spec"), default="hivis",
                    help="no-spec: the same load against stock vLLM (a baseline for the memory trend)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="CI's short form (same checks, fewer seconds)")
    ap.add_argument("--out", default="benchmarks/results/soak")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from hivis_testbed import assets
    from hivis_testbed.server import VLLMServer
    from vllm_hivis.serving.acceptance import from_prometheus_text
    from vllm_hivis.train.target import image_size

    target = assets.tiny_target()
    size = image_size(target)
    prompts = workload(size)
    t0 = time.time()
    refs = reference_answers(target, prompts)
    spec = {"method": "hivis", "model": assets.tiny_drafter(), "num_speculative_tokens": args.k}
    server_args = ["--block-size", "32", "--num-gpu-blocks-override", str(args.blocks), "--max-num-seqs", "16"]
    if args.method == "hivis":
        server_args += ["--speculative-config", json.dumps(spec)]
    with VLLMServer(target, server_args) as srv:
        with urllib.request.urlopen(srv.url + "/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        mem = MemorySampler(srv.proc.pid)
        mem.start()
        before = srv.metrics()
        stats = asyncio.run(drive(srv.url, model, prompts, refs, args.seconds, args.concurrency, args.seed))
        mem.stop.set()
        after = srv.metrics()
        alive = srv.proc.poll() is None
    preemptions = _counter(after, "vllm:num_preemptions_total") - _counter(before, "vllm:num_preemptions_total")
    acc = from_prometheus_text(after).minus(from_prometheus_text(before))
    result = {
        "meta": {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "seconds": args.seconds,
                 "concurrency": args.concurrency, "kv_blocks": args.blocks, "block_size": 32, "k": args.k,
                 "method": args.method,
                 "command": "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "wall_s": round(time.time() - t0, 1)},
        "requests": stats["requests"], "greedy_checked": stats["greedy"], "by_kind": stats["by_kind"],
        "errors": stats["errors"][:20], "num_errors": len(stats["errors"]),
        "divergences": stats["divergences"][:5], "num_divergences": len(stats["divergences"]),
        "preemptions": preemptions, "server_alive": alive,
        "rss_mb_start": round(mem.samples[0][1], 1) if mem.samples else None,
        "rss_mb_end": round(mem.samples[-1][1], 1) if mem.samples else None,
        "rss_trend_mb_per_min": round(mem.trend_mb_per_min(), 2), "acceptance": acc.summary(),
    }
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(
            f"Soak, {args.method} ({result['meta']['command']}; {result['meta']['machine']}): "
            f"{result['requests']} requests "
            f"({result['by_kind']}) in {args.seconds:.0f} s from {args.concurrency} concurrent clients, "
            f"{result['greedy_checked']} greedy ones compared with no-spec; errors {result['num_errors']}, "
            f"divergences {result['num_divergences']}, preemptions {preemptions}, server memory "
            f"{result['rss_mb_start']} -> {result['rss_mb_end']} MB (trend {result['rss_trend_mb_per_min']} MB/min "
            f"over the second half), {acc.tokens_per_step:.2f} tokens/step.\n")
    print(json.dumps(result, indent=2))
    return result


def _counter(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


if __name__ == "__main__":
    r = main()
    sys.exit(0 if r["num_errors"] == 0 and r["num_divergences"] == 0 and r["server_alive"] else 1)
