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


@pytest.mark.parametrize("target", ["next", "qwen"])
def test_offline_quick_on_variant(tmp_path, target):
    """--target next: the many-image-token workload (744 per scene); --target qwen: M-RoPE, prompts
    through Qwen's own chat template; each with its own drafter."""
    res = run("offline.py", tmp_path / target, "--target", target, "--workloads", "describe", "--temps", "0")
    rows = [r for r in res["rows"] if not r.get("offline")]
    assert {r["method"] for r in rows} == {"no-spec", "ngram", "hivis"}
    assert all(r["same_tokens_as_no_spec"] for r in rows if r["method"] != "no-spec")
    hivis = [r for r in rows if r["method"] == "hivis"]
    share = {"next": 10, "qwen": 2}[target]  # image rows hidden: 744 (NeXT) or 144 (Qwen) per scene
    assert all(r["drafter_prefill_tokens"] < r["target_prefill_tokens"] / share for r in hivis)
    assert all(r["acceptance"]["tokens_per_step"] > 2 for r in hivis)
    assert [r["method"] for r in res["rows"] if r.get("offline")] == ["hivis"]


def test_scaling_quick(tmp_path):
    res = run("scaling.py", tmp_path / "scaling")
    hivis = {r["image_tokens"]: r for r in res["rows"] if r["method"] == "hivis"}
    eagle = {r["image_tokens"]: r for r in res["rows"] if r["method"] == "eagle"}
    assert sorted(hivis) == sorted(eagle) == [144, 288]
    # hivis's drafter prefill grows only by the text between the images; EAGLE's by every image row
    assert hivis[288]["drafter_prefill_tokens"] - hivis[144]["drafter_prefill_tokens"] <= 2
    assert eagle[288]["drafter_prefill_tokens"] > eagle[144]["drafter_prefill_tokens"] + 100


def test_step_parts_quick(tmp_path):
    """The side-by-side step profile: both methods' parts timed, nested parts within their whole."""
    out = tmp_path / "step_parts"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_parts.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["method"]: row["ms_per_step"] for row in json.loads(Path(f"{out}.json").read_text())["rows"]}
    assert set(rows) == {"hivis", "eagle (same weights)"}
    for name, ms in rows.items():
        m = {k: v[0] for k, v in ms.items()}
        assert 0 < m["attention"] < m["model"] < m["propose"] < m["step"], (name, m)
        assert m["set_inputs_first_pass"] < m["propose"], (name, m)
    assert rows["hivis"]["_plan"][0] > 0 and rows["eagle (same weights)"]["_plan"][0] == 0
    assert "hivis / EAGLE drafting time per step" in Path(f"{out}.md").read_text()


def test_online_quick(tmp_path):
    res = run("online.py", tmp_path / "online")
    load = [r for r in res["rows"] if "concurrency" in r]
    assert {r["method"] for r in load} == {"no-spec", "eagle", "hivis"}
    assert all(r["same_text_as_no_spec"] for r in load)
    bench = next(r["vllm_bench_serve"] for r in res["rows"] if "vllm_bench_serve" in r)
    assert bench["completed"] == 2 and bench["failed"] == 0


def test_equal_budget_on_freshly_generated_layer_data(tmp_path):
    """The multi-layer pipeline end to end at toy size: generate-data (vLLM answers, transformers
    layers 1..3 of the tiny target) feeds benchmarks/equal_budget.py, which trains and evaluates a
    last-layer and a multi-layer hivis drafter at the same budget on both workloads."""
    from hivis_testbed import assets

    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "vllm_hivis.cli", "generate-data", "--target", assets.tiny_target(),
                        "--out", str(data), "--tinyworld", "train:0:6", "--max-tokens", "32", "--shard-size", "3",
                        "--feature-layers", "1,2,3"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((data / "manifest.json").read_text())["feature_layers"] == [1, 2, 3]
    out = tmp_path / "eb"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "equal_budget.py"), "--data", str(data),
                        "--target", assets.tiny_target(), "--rows", "last,ml124", "--seeds", "0", "--steps", "3",
                        "--batch-size", "2", "--unroll", "2", "--tinyworld-n", "2", "--photos-n", "1",
                        "--runs", str(tmp_path / "runs"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(Path(f"{out}.json").read_text())["results"]
    assert [(x["row"], x["feature_layers"]) for x in res] == [("last", None), ("ml124", [1, 2, 4])]
    assert all(x[w]["drafts"] > 0 for x in res for w in ("tinyworld", "photos"))
    assert Path(f"{out}.md").read_text().count("| hivis, layers 1,2,4 fused | 0 |") == 2  # one row per workload
    assert Path(f"{out}.png").stat().st_size > 0
