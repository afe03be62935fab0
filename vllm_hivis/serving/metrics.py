"""Drafter vs target prefill tokens: HiViS's claim, measured where the drafter runs.

Worker side (`PrefillCounters`, owned by the proposer): for every request it adds up the rows the
drafter ran on and the target rows, over the request's prompt. When a request's prompt is done it
logs one DEBUG line, folds the request into the totals and writes them to a small JSON file
(``<stats dir>/<pid>-<ns>.json``, atomically). An INFO summary is logged at most every
``VLLM_HIVIS_LOG_INTERVAL`` seconds (default 10, vLLM's stats interval).

Frontend side (`PrefillCollector`, registered in the Prometheus registry by the plugin in the
process that starts the engine): sums those files and exposes, next to vLLM's own counters,
    vllm:hivis_drafter_prefill_tokens_total   rows the drafter prefilled (text tokens)
    vllm:hivis_target_prefill_tokens_total    prompt tokens the target prefilled
    vllm:hivis_prefill_requests_total         requests whose prompt is done
so /metrics, `vllm bench serve` scrapes and ``LLM(..., disable_log_stats=False).get_metrics()``
all show the ratio. The stats directory travels to engine and worker processes in the env var
``VLLM_HIVIS_STATS_DIR`` (the frontend creates it before the engine starts).
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


class PrefillCounters:
    def __init__(self, stats_dir: str | None = None):
        self.stats_dir = stats_dir if stats_dir is not None else os.environ.get(STATS_DIR_ENV)
        # req_id -> [drafter rows, target rows] of prompts still being prefilled. A request may skip
        # steps mid-prefill (token budget) and leave the batch for a while, so entries stay until
        # the prompt is done; the oldest are evicted beyond MAX_PENDING (requests aborted mid-prompt).
        self.pending: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self.totals = {"drafter": 0, "target": 0, "requests": 0}
        self._last_log = time.monotonic()
        self._logged = dict(self.totals)
        self.interval = float(os.environ.get("VLLM_HIVIS_LOG_INTERVAL", "10"))
        self._file = f"{os.getpid()}-{time.time_ns()}.json"  # unique even if a pid is reused

    def add(self, req_id: str, drafter_rows: int, target_rows: int, prompt_done: bool) -> None:
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
        if not self.stats_dir:
            return
        path = Path(self.stats_dir) / self._file
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.totals))
            os.replace(tmp, path)
        except OSError as e:  # metrics must never take the engine down
            logger.warning("hivis: could not write prefill stats to %s: %s", path, e)


def read_totals(stats_dir: str) -> dict[str, int]:
    totals = {k: 0 for k in NAMES}
    for f in Path(stats_dir).glob("*.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for k in totals:
            totals[k] += int(data.get(k, 0))
    return totals


class PrefillCollector:
    """prometheus_client custom collector over the worker files."""

    def __init__(self, stats_dir: str):
        self.stats_dir = stats_dir

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        totals = read_totals(self.stats_dir)
        docs = {"drafter": "Prompt rows the hivis drafter prefilled (text tokens only).",
                "target": "Prompt tokens the target prefilled, for requests served with hivis.",
                "requests": "Requests whose prompt prefill finished under hivis."}
        for k, name in NAMES.items():
            fam = CounterMetricFamily(name, docs[k])
            fam.add_metric([], totals[k])
            yield fam


_collector: PrefillCollector | None = None


def ensure_frontend_collector() -> None:
    """In the process that starts engines: create the stats dir (inherited by children) and
    register the collector once. Children find the env var already set and only write."""
    global _collector
    if _collector is not None:
        return
    stats_dir = os.environ.get(STATS_DIR_ENV)
    if stats_dir is None:
        stats_dir = tempfile.mkdtemp(prefix="vllm-hivis-stats-")
        os.environ[STATS_DIR_ENV] = stats_dir
        atexit.register(shutil.rmtree, stats_dir, True)
    from prometheus_client import REGISTRY

    _collector = PrefillCollector(stats_dir)
    REGISTRY.register(_collector)
