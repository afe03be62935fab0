"""Online serving: `vllm serve` with each method under an OpenAI-client load, and `vllm bench serve`.

    python benchmarks/online.py --out benchmarks/results/online                 # ~10 min on 2 CPU cores
    python benchmarks/online.py --quick --out /tmp/online                       # CI

For each method (no-spec, eagle, hivis by default): one `vllm serve` on the tiny target; for each
concurrency of the sweep, `--n` streamed chat completions with an image each (held-out tiny-world
descriptions, greedy, as data URLs) from that many concurrent clients (this script's own async
load, the openai package): throughput (output tokens/s over the wave), TTFT (median and p90 over
requests, at the client: first content chunk), TPOT (vLLM's own per-request histogram, its mean
over the wave) and the spec-decode counters, both scraped from /metrics before and after. Then
`vllm bench serve` (OpenAI chat backend, vLLM's random-mm dataset: random text plus one random
168x168 image per request) against the same server: its summary is kept as it reports it.
Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import meta, methods, pyplot, write  # noqa: E402
from workloads import cases  # noqa: E402

TPOT = "vllm:request_time_per_output_token_seconds"  # vLLM's per-request TPOT histogram


def messages(image_size: int, n: int) -> list[list[dict]]:
    from hivis_testbed.demo import image_data_url

    return [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(imgs[0])}},
                                          {"type": "text", "text": q}]}]
            for q, imgs in cases("describe", n, image_size)]


async def one(oai, model, msgs, max_tokens) -> dict:
    t0 = time.perf_counter()
    stamps, text = [], ""
    stream = await oai.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0.0,
                                               stream=True, stream_options={"include_usage": True})
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text += chunk.choices[0].delta.content
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "tokens": tokens, "text": text}


async def wave(url, model, prompts, concurrency, max_tokens) -> tuple[list[dict], float]:
    import openai

    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0)
    queue = list(enumerate(prompts))
    results: list[dict | None] = [None] * len(prompts)

    async def worker():
        while queue:
            i, msgs = queue.pop(0)
            results[i] = await one(oai, model, msgs, max_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await oai.close()
    return results, wall


def series(text: str, name: str) -> float:
    """Sum of a /metrics series over its label sets."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x == x)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def bench_serve(url: str, model: str, tokenizer: str, n: int) -> dict:
    """`vllm bench serve` against the running server; its saved result JSON."""
    from hivis_testbed.server import vllm_executable

    d = tempfile.mkdtemp(prefix="bench-serve-")
    cmd = [vllm_executable(), "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
           "--base-url", url, "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random-mm",
           "--num-prompts", str(n), "--max-concurrency", "4", "--random-input-len", "48", "--random-output-len",
           "32", "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
           "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
           "--random-mm-bucket-config", "{(168, 168, 1): 1.0}", "--ignore-eos", "--save-result",
           "--result-dir", d, "--result-filename", "result.json", "--seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    res = json.loads((Path(d) / "result.json").read_text())
    keep = ("completed", "failed", "total_output_tokens", "output_throughput", "median_ttft_ms", "median_tpot_ms",
            "spec_decode_acceptance_length", "spec_decode_acceptance_rate")
    return {k: res[k] for k in keep if k in res}


def serve_method(name, spec, args, prompts) -> list[dict]:
    import urllib.request

    from hivis_testbed import assets
    from hivis_testbed.server import VLLMServer
    from vllm_hivis.serving.acceptance import from_prometheus_text

    server_args = ["--max-num-seqs", str(max(args.concurrency)), "--limit-mm-per-prompt", '{"image": 1}']
    if spec:
        server_args += ["--speculative-config", json.dumps(spec)]
    rows = []
    with VLLMServer(assets.tiny_target(), server_args) as srv:
        with urllib.request.urlopen(srv.url + "/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        asyncio.run(wave(srv.url, model, prompts[:2], 2, args.max_tokens))  # warm-up
        for c in args.concurrency:
            m0 = srv.metrics()
            res, wall = asyncio.run(wave(srv.url, model, prompts, c, args.max_tokens))
            m1 = srv.metrics()
            acc = from_prometheus_text(m1).minus(from_prometheus_text(m0))
            tpot = [series(m, TPOT + "_sum") for m in (m0, m1)], [series(m, TPOT + "_count") for m in (m0, m1)]
            tokens = sum(r["tokens"] for r in res)
            rows.append({"method": name, "concurrency": c, "requests": len(res), "output_tokens": tokens,
                         "throughput": round(tokens / wall, 2),
                         "ttft_ms": [round(1e3 * pct([r["ttft"] for r in res], q), 1) for q in (0.5, 0.9)],
                         "tpot_ms": round(1e3 * (tpot[0][1] - tpot[0][0]) / max(1.0, tpot[1][1] - tpot[1][0]), 2),
                         "texts": [r["text"] for r in res],
                         **({"acceptance": {k: v for k, v in acc.summary().items()
                                            if k in ("tokens_per_step", "accepted_per_draft", "per_position")}}
                            if spec else {})})
            print(f"{name:8s} concurrency {c}: {tokens / wall:.1f} tok/s", flush=True)
        if name == args.bench_serve_method:
            rows.append({"method": name, "vllm_bench_serve": bench_serve(srv.url, model, assets.tiny_target(),
                                                                         args.bench_serve_prompts)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/online")
    ap.add_argument("--methods", default="no-spec,eagle,hivis")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--n", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--bench-serve-method", default="hivis", help="run `vllm bench serve` against this method")
    ap.add_argument("--bench-serve-prompts", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.n, args.max_tokens, args.bench_serve_prompts = "1,2", 2, 16, 2
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    from hivis_testbed import assets
    from vllm_hivis.train.target import image_size

    size = image_size(assets.tiny_target())
    prompts = messages(size, args.n)
    rows = []
    for name, spec in methods(args.k, args.methods.split(",")):
        rows += serve_method(name, spec, args, prompts)
    load = [r for r in rows if "concurrency" in r]
    base = {r["concurrency"]: r for r in load if r["method"] == "no-spec"}
    for r in load:
        b = base.get(r["concurrency"])
        r["speedup_vs_no_spec"] = round(r["throughput"] / b["throughput"], 3) if b else None
        r["same_text_as_no_spec"] = r["texts"] == b["texts"] if b else None
    m = meta(argv, "online.py", k=args.k, n=args.n, max_tokens=args.max_tokens)
    lines = [f"`vllm serve` on the tiny target, {m['machine']}, vLLM {m['vllm']}, {args.n} streamed greedy chat "
             f"requests with one image per concurrency level, up to {args.max_tokens} tokens, k={args.k}.", "",
             "| method | concurrency | output tokens/s | vs no-spec | TTFT ms p50 / p90 | TPOT ms (mean) "
             "| tokens/step | same text as no-spec |", "|---|---|---|---|---|---|---|---|"]
    for r in load:
        a = r.get("acceptance")
        lines.append(f"| {r['method']} | {r['concurrency']} | {r['throughput']} | "
                     f"{r['speedup_vs_no_spec'] or 0:.2f}x | {r['ttft_ms'][0]} / {r['ttft_ms'][1]} | "
                     f"{r['tpot_ms']} | {a['tokens_per_step'] if a else 1.0:.2f} | "
                     f"{ {True: 'yes', False: '**NO**', None: 'n/a'}[r['same_text_as_no_spec']]} |")
    for r in rows:
        if "vllm_bench_serve" in r:
            lines += ["", f"`vllm bench serve` (random-mm, {args.bench_serve_prompts} prompts, concurrency 4) "
                      f"against the {r['method']} server: " + ", ".join(f"{k} {v}" for k, v in
                                                                         r["vllm_bench_serve"].items())]
    write(args.out, m, [{k: v for k, v in r.items() if k != "texts"} for r in rows], lines)
    plot(load, args.out)
    print("\n".join(lines))
    return 1 if any(r["same_text_as_no_spec"] is False for r in load) else 0


def plot(load, out: str) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for meth in dict.fromkeys(r["method"] for r in load):
        pts = sorted((r["concurrency"], r["throughput"], r["tpot_ms"]) for r in load if r["method"] == meth)
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=meth)
        a2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=meth)
    a1.set_xlabel("concurrent clients")
    a1.set_ylabel("output tokens/s")
    a2.set_xlabel("concurrent clients")
    a2.set_ylabel("TPOT ms (mean, server side)")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
