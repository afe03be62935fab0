"""Drafter cost vs the number of image tokens: hivis (text rows only) vs an EAGLE drafter that
runs over every target row, image rows included.

    python benchmarks/drafter_scaling.py --out benchmarks/results/drafter_scaling

For N_v image tokens and a 32-token text prompt, the drafter's prefill covers 32 rows with hivis
and N_v + 32 with EAGLE; every later draft step attends over that many keys. Measured with the
plain-torch drafter (one decoder layer, random weights: cost does not depend on the weights) at
hidden size 1024 / 16 heads on this machine's CPU, median of repeats. Writes .json, .md, .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    from transformers import DynamicCache

    from vllm_hivis.method.checkpoint import DrafterSpec
    from vllm_hivis.train.drafters import HiViSDrafter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/drafter_scaling")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--text", type=int, default=32)
    ap.add_argument("--image-tokens", default="64,256,576,1152,2304")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    H = args.hidden
    text = {"hidden_size": H, "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 4 * H,
            "vocab_size": 1000, "max_position_embeddings": 8192}
    d = HiViSDrafter.for_target(text, DrafterSpec(H, 1000)).eval()
    rows = []
    with torch.no_grad():
        for nv in (int(x) for x in args.image_tokens.split(",")):
            res = {"image_tokens": nv, "text_tokens": args.text}
            for name, n in (("hivis", args.text), ("eagle", nv + args.text)):
                e, f = torch.randn(1, n, H), torch.randn(1, n, H)
                pos = torch.arange(n)[None]

                def prefill(e=e, f=f, pos=pos, n=n):
                    c = DynamicCache()
                    d(e, f, pos, mask=torch.ones(n, n, dtype=torch.bool).tril()[None, None], cache=c)
                    return c

                cache = prefill()
                q1, f1 = torch.randn(1, 1, H), torch.randn(1, 1, H)

                def step(q1=q1, f1=f1, n=n, cache=cache):  # one draft step over the n cached rows (cache not grown)
                    d(q1, f1, torch.tensor([[n]]), mask=torch.ones(1, 1, 1, n + 1, dtype=torch.bool),
                      cache=_Frozen(cache))

                res[f"{name}_prefill_rows"] = n
                res[f"{name}_prefill_ms"] = round(1000 * timed(prefill, args.repeats), 2)
                res[f"{name}_step_ms"] = round(1000 * timed(step, args.repeats * 4), 3)
            rows.append(res)
            print(res, flush=True)
    Path(args.out + ".json").parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"Drafter cost vs image tokens (text prompt {args.text} tokens; 1-layer drafter, hidden {H}, 16 heads, "
             f"fp32, torch on this machine's CPU, {torch.get_num_threads()} threads, median of {args.repeats}).", "",
             "| image tokens | hivis prefill rows | EAGLE prefill rows | hivis prefill ms | EAGLE prefill ms | "
             "hivis draft step ms | EAGLE draft step ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image_tokens']} | {r['hivis_prefill_rows']} | {r['eagle_prefill_rows']} | "
                     f"{r['hivis_prefill_ms']} | {r['eagle_prefill_ms']} | {r['hivis_step_ms']} | "
                     f"{r['eagle_step_ms']} |")
    lines += ["", "Command: `python benchmarks/drafter_scaling.py`"]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    plot(rows, Path(args.out + ".png"))
    print("\n".join(lines))
    return 0


class _Frozen:
    """A cache view that returns the cached keys plus the new ones without storing them."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, k, v, layer_idx, *a, **kw):
        ks, vs = self.cache.layers[layer_idx].keys, self.cache.layers[layer_idx].values
        return torch.cat([ks, k], -2), torch.cat([vs, v], -2)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["image_tokens"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in ("hivis", "eagle"):
        ax[0].plot(x, [r[f"{name}_prefill_ms"] for r in rows], marker="o", label=name)
        ax[1].plot(x, [r[f"{name}_step_ms"] for r in rows], marker="o", label=name)
    ax[0].set_title("drafter prefill (ms)")
    ax[1].set_title("one draft step (ms)")
    for a in ax:
        a.set_xlabel("image tokens")
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
