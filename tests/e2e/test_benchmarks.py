"""The benchmarks' --quick modes (every method and code path, tiny sizes), so the scripts never
rot: each exits 0 (it exits 1 when a greedy output differs from no-spec's), writes its JSON, table
and plot, and its rows cover what was asked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def run(script, out, *extra):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for suffix in (".json", ".md", ".png"):
        assert Path(f"{out}{suffix}").stat().st_size > 0, suffix
    return json.loads(Path(f"{out}.json").read_text())


def test_offline_quick(tmp_path):
    res = run("offline.py", tmp_path / "offline")
    rows = [r for r in res["rows"] if not r.get("offline")]
    assert {r["method"] for r in rows} == {"no-spec", "ngram", "eagle", "text", "hivis"}
    assert {r["workload"] for r in rows} == {"describe", "qa", "photos"}
    assert {(r["temperature"], r["batch"]) for r in rows} == {(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)}
    greedy = [r for r in rows if r["temperature"] == 0 and r["method"] != "no-spec"]
    assert all(r["same_tokens_as_no_spec"] for r in greedy)
    hivis = [r for r in greedy if r["method"] == "hivis" and r["workload"] == "describe"]
    assert all(r["acceptance"]["tokens_per_step"] > 2 for r in hivis)  # the shipped drafter drafts well here
    assert all(0 < r["drafting_share"] < 1 for r in rows if r["method"] != "no-spec")
    assert all(r["drafter_prefill_tokens"] < r["target_prefill_tokens"] / 4 for r in hivis)  # text rows only
    assert {r["method"] for r in res["rows"] if r.get("offline")} == {"vispec", "hivis"}


def test_scaling_quick(tmp_path):
    res = run("scaling.py", tmp_path / "scaling")
    hivis = {r["image_tokens"]: r for r in res["rows"] if r["method"] == "hivis"}
    eagle = {r["image_tokens"]: r for r in res["rows"] if r["method"] == "eagle"}
    assert sorted(hivis) == sorted(eagle) == [144, 288]
    # hivis's drafter prefill grows only by the text between the images; EAGLE's by every image row
    assert hivis[288]["drafter_prefill_tokens"] - hivis[144]["drafter_prefill_tokens"] <= 2
    assert eagle[288]["drafter_prefill_tokens"] > eagle[144]["drafter_prefill_tokens"] + 100


def test_online_quick(tmp_path):
    res = run("online.py", tmp_path / "online")
    load = [r for r in res["rows"] if "concurrency" in r]
    assert {r["method"] for r in load} == {"no-spec", "eagle", "hivis"}
    assert all(r["same_text_as_no_spec"] for r in load)
    bench = next(r["vllm_bench_serve"] for r in res["rows"] if "vllm_bench_serve" in r)
    assert bench["completed"] == 2 and bench["failed"] == 0
