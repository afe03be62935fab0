"""Shared pieces of the benchmarks: methods, run metadata, timing, result files.

Every benchmark writes <out>.json (meta: machine, versions, commit, command; rows), <out>.md (a
table with the command that made it) and PNG plots; ratios are only meaningful within one run on
one machine, so every table is measured side by side in one process.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def methods(k: int, names: list[str], target: str = "tiny") -> list[tuple[str, dict | None]]:
    """(name, speculative_config) for each served method, with the shipped drafters:
    no-spec, ngram (vLLM's prompt lookup), eagle (vLLM's own EAGLE, an image-seeing drafter),
    text (the hivis format without target features), hivis (the shipped drafter). `target`:
    "tiny" (the LLaVA-1.5 tiny target) or a variant ("next"), which has a hivis drafter only."""
    from hivis_testbed import assets

    table = {
        "no-spec": lambda: None,
        "ngram": lambda: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
                          "prompt_lookup_min": 2},
        "hivis": lambda: {"method": "hivis", "num_speculative_tokens": k,
                          "model": assets.tiny_drafter() if target == "tiny" else assets.variant(target)[1]},
    }
    if target == "tiny":
        table["eagle"] = lambda: {"method": "eagle", "model": assets.baseline("eagle"), "num_speculative_tokens": k}
        table["text"] = lambda: {"method": "hivis", "model": assets.baseline("text"), "num_speculative_tokens": k}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown} for target {target!r}; expected some of {list(table)}")
    return [(n, table[n]()) for n in names]


DESCRIBE = {"no-spec": "no speculation", "ngram": "vLLM ngram (prompt lookup 2..4)",
            "eagle": "vLLM EAGLE, drafter sees image tokens", "text": "text-only drafter (no target features)",
            "hivis": "hivis (this repo)", "vispec": "ViSpec-style (offline replay)"}


def meta(argv: list[str] | None, script: str, **extra) -> dict:
    import torch

    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # the benchmarks that need no engine run without vLLM too
        vllm_version = None
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                         stderr=subprocess.DEVNULL).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                             text=True).strip())
    except Exception:
        commit, dirty = None, None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {device}", "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm_version, "commit": commit, "dirty": dirty,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)]),
            **extra}


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float], digits: int = 1) -> str:
    """'median [min-max]' of repetitions."""
    f = f".{digits}f"
    return f"{med(xs):{f}} [{min(xs):{f}}-{max(xs):{f}}]" if len(xs) > 1 else f"{med(xs):{f}}"


def write(out: str, meta_: dict, rows: list[dict], md: list[str]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta_, "rows": rows}, indent=2) + "\n")
    Path(out + ".md").write_text("\n".join([*md, "", f"Command: `{meta_['command']}` (commit {meta_['commit']}"
                                            + (", uncommitted changes" if meta_["dirty"] else "") + ", "
                                            + meta_["date"] + ")"]) + "\n")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class DraftTimer:
    """Wall time the V1 model runner spends proposing drafts (the drafter's forward passes and
    their input preparation), via an instance wrapper of ``propose_draft_token_ids``. On a GPU
    each call is bracketed by ``torch.cuda.synchronize()`` (that serialises the step a little:
    figures are for comparing methods)."""

    def __init__(self, runner):
        import torch

        self.seconds, self.calls = 0.0, 0
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        orig = runner.propose_draft_token_ids

        def timed(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = orig(*args, **kwargs)
            sync()
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        runner.propose_draft_token_ids = timed

    def snapshot(self) -> tuple[float, int]:
        return self.seconds, self.calls
