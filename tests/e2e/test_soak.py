"""The soak's short form (benchmarks/soak.py; the full soak is its documented command): 64
concurrent mixed requests (image / text-only / two images, greedy and sampled, streamed and not)
against a hivis server whose KV cache forces preemption."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_soak_short_form():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    r = soak.main(["--seconds", "30", "--concurrency", "64", "--quick"])
    assert r["server_alive"] and r["num_errors"] == 0, r["errors"]
    assert r["num_divergences"] == 0, r["divergences"]
    assert r["greedy_checked"] >= 10 and set(r["by_kind"]) == {"image", "text-only", "two images"}
    assert r["preemptions"] > 0  # the small KV cache really preempted requests
    assert r["acceptance"]["accepted"] > 0
