"""Drafter vs target prefill tokens: HiViS's claim, measured where the drafter runs.

Worker side (`PrefillCounters`, owned by the proposer or speculator): for every request it adds
up the rows the drafter ran on and the target rows, over the request's prompt. When a request's
prompt is done it logs one DEBUG line, folds the request into the totals and writes them to a
small JSON file (``<run dir>/<pid>-<ns>.json``, atomically). An INFO summary is logged at most
every ``VLLM_HIVIS_LOG_INTERVAL`` seconds (default 10, vLLM's stats interval). Only the first
tensor-parallel rank of an engine counts (every rank sees the same rows): counted once per engine.

Frontend side (`PrefillCollector`, registered in the Prometheus registry in the process that
builds the engine config): sums the files of the runs it started and exposes, next to vLLM's own
counters,
    vllm:hivis_drafter_prefill_tokens_total   rows the drafter prefilled (text tokens)
    vllm:hivis_target_prefill_tokens_total    prompt tokens the target prefilled
    vllm:hivis_prefill_requests_total         requests whose prompt is done
so /metrics, `vllm bench serve` scrapes and ``LLM(..., disable_log_stats=False).get_metrics()``
all show the ratio.

Run directory: ``<root>/<instance_id>``, with root ``VLLM_HIVIS_STATS_DIR`` if set, else
``<tmp>/vllm-hivis-stats-<uid>``, and vLLM's per-config ``instance_id``, which travels with the
config into every engine and worker process. So every run starts clean (files of earlier runs in
a shared root are never summed), and nothing per-run goes through the environment: vLLM hashes
its declared ``VLLM_*`` variables into the torch.compile cache key, which a fresh path per run
would invalidate at every start. The frontend removes its run directories at exit.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("vllm_hivis.serving.metrics")

STATS_DIR_ENV = "VLLM_HIVIS_STATS_DIR"
MAX_PENDING = 4096
NAMES = {
    "drafter": "vllm:hivis_drafter_prefill_tokens",
    "target": "vllm:hivis_target_prefill_tokens",
    "requests": "vllm:hivis_prefill_requests",
}


def stats_root() -> Path:
    env = os.environ.get(STATS_DIR_ENV)
    return Path(env) if env else Path(tempfile.gettempdir()) / f"vllm-hivis-stats-{os.getuid()}"


def run_dir(instance_id: str) -> Path:
    """Where the counters of the engine run with this vLLM config ``instance_id`` live."""
    assert instance_id, "vLLM sets VllmConfig.instance_id in __post_init__"
    return stats_root() / str(instance_id)


class PrefillCounters:
    def __init__(self, stats_dir: str | os.PathLike | None = None, writer: bool = True):
        # stats_dir: this run's directory (None: count and log, write nothing); writer: False on
        # every tensor-parallel rank but the first (add() is then a no-op)
        self.stats_dir = None if stats_dir is None else Path(stats_dir)
        self.writer = writer
        # req_id -> [drafter rows, target rows] of prompts still being prefilled. A request may skip
        # steps mid-prefill (token budget) and leave the batch for a while, so entries stay until
        # the prompt is done; the oldest are evicted beyond MAX_PENDING (requests aborted mid-prompt).
        self.pending: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self.totals = {"drafter": 0, "target": 0, "requests": 0}
        self._last_log = time.monotonic()
        self._logged = dict(self.totals)
        self.interval = float(os.environ.get("VLLM_HIVIS_LOG_INTERVAL", "10"))
        self._file = f"{os.getpid()}-{time.time_ns()}.json"  # unique even if a pid is reused

    @classmethod
    def for_engine(cls, vllm_config) -> PrefillCounters:
        """The counters of a proposer / speculator built for `vllm_config` (in its worker process)."""
        from vllm.distributed import parallel_state

        tp_rank = (parallel_state.get_tensor_model_parallel_rank()
                   if parallel_state.model_parallel_is_initialized() else 0)
        return cls(run_dir(vllm_config.instance_id), writer=tp_rank == 0)

    def add(self, req_id: str, drafter_rows: int, target_rows: int, prompt_done: bool) -> None:
        if not self.writer:
            return
        acc = self.pending.setdefault(req_id, [0, 0])
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)
        acc[0] += drafter_rows
        acc[1] += target_rows
        if prompt_done:
            d, t = self.pending.pop(req_id)
            self.totals["drafter"] += d
            self.totals["target"] += t
            self.totals["requests"] += 1
            logger.debug("hivis prefill: request %s drafter %d / target %d tokens (%.1f%%)", req_id, d, t,
                         100.0 * d / max(1, t))
            self._write()
            self._maybe_log()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < self.interval:
            return
        d = self.totals["drafter"] - self._logged["drafter"]
        t = self.totals["target"] - self._logged["target"]
        n = self.totals["requests"] - self._logged["requests"]
        logger.info("HiViS prefill: drafter %d / target %d tokens (%.1f%%) over %d requests", d, t,
                    100.0 * d / max(1, t), n)
        self._last_log, self._logged = now, dict(self.totals)

    def _write(self) -> None:
        if self.stats_dir is None:
            return
        path = self.stats_dir / self._file
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.totals))
            os.replace(tmp, path)
        except OSError as e:  # metrics must never take the engine down
            logger.warning("hivis: could not write prefill stats to %s: %s", path, e)


def read_totals(*run_dirs: str | os.PathLike) -> dict[str, int]:
    totals = {k: 0 for k in NAMES}
    for d in run_dirs:
        for f in Path(d).glob("*.json"):
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            for k in totals:
                totals[k] += int(data.get(k, 0))
    return totals


class PrefillCollector:
    """prometheus_client custom collector over a run's directory (all its engines' files)."""

    def __init__(self, run_dirs: list[Path] | None = None):
        self.run_dirs = run_dirs if run_dirs is not None else []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        totals = read_totals(*self.run_dirs)
        docs = {"drafter": "Prompt rows the hivis drafter prefilled (text tokens only).",
                "target": "Prompt tokens the target prefilled, for requests served with hivis.",
                "requests": "Requests whose prompt prefill finished under hivis."}
        for k, name in NAMES.items():
            fam = CounterMetricFamily(name, docs[k])
            fam.add_metric([], totals[k])
            yield fam


_collector: PrefillCollector | None = None


def watch_run(instance_id: str) -> Path:
    """In the process that builds an engine config: expose that run's counters from now on (the
    collector is registered once per process and follows the latest run, as vLLM's own counters
    start over with a new engine) and remove the run's files at exit."""
    global _collector
    d = run_dir(instance_id)
    if _collector is None:
        from prometheus_client import REGISTRY

        _collector = PrefillCollector()
        REGISTRY.register(_collector)
    if _collector.run_dirs != [d]:
        _collector.run_dirs[:] = [d]
        atexit.register(shutil.rmtree, d, True)
    return d
