"""The drafter pipeline on Ray, on CPU: data generation as a Ray Data pipeline of target actors,
resumable; training as a Ray Train DDP run (2 gloo workers); both agree with the in-process path."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from hivis_testbed import assets
from vllm_hivis.method.checkpoint import read_spec
from vllm_hivis.train.data import Manifest, load_records
from vllm_hivis.train.generate import generate_dataset, parse_responses
from vllm_hivis.train.losses import Recipe
from vllm_hivis.train.trainer import TrainConfig, train

from .helpers import image_size

pytestmark = pytest.mark.e2e


def source(count):
    return {"kind": "tinyworld", "split": "train", "start": 0, "count": count, "image_size": image_size(),
            "prompt_kind": "mix"}


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    generate_dataset(assets.tiny_target(), str(out), source(4), parse_responses("greedy,sample:1.0"), shard_size=2)
    return out


def test_local_generation_and_resume(local_data):
    man, recs = load_records(local_data)
    assert man.num_samples == 8 and len(man.shards) == 2
    assert {r["mode"] for r in recs} == {"greedy", "sample"}
    for r in recs:
        assert r["hidden"].shape == (len(r["input_ids"]), man.hidden_size)
        assert r["input_ids"][r["prompt_len"] - 1] != 2  # the prompt is not an answer
        assert int(r["input_ids"][-1]) == 2 or len(r["input_ids"]) - r["prompt_len"] == 160  # EOS or max
    first = (local_data / "shard-00001.safetensors").read_bytes()
    (local_data / "shard-00001.safetensors").unlink()  # an interrupted run: one shard missing
    man2 = generate_dataset(assets.tiny_target(), str(local_data), source(4),
                            parse_responses("greedy,sample:1.0"), shard_size=2)
    assert man2.num_samples == 8
    again = load_records(local_data)[1]
    greedy = lambda rs: [(r["id"], r["input_ids"].tolist()) for r in rs if r["mode"] == "greedy"]  # noqa: E731
    assert greedy(again) == greedy(recs)  # the regenerated shard holds the same greedy answers
    assert len(first) > 0


@pytest.fixture(scope="module")
def ray_session():
    import ray

    if ray.is_initialized():  # an earlier test's (or vLLM's) session would be joined with other resources
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_data_generation_matches_local(ray_session, local_data, tmp_path):
    man = generate_dataset(assets.tiny_target(), str(tmp_path / "ray"), source(4), parse_responses("greedy,sample:1.0"),
                           shard_size=2, workers=2)
    assert man.num_samples == 8
    local = {(r["id"], r["mode"]): r for r in load_records(local_data)[1]}
    for r in load_records(tmp_path / "ray")[1]:
        if r["mode"] == "greedy":
            ref = local[(r["id"], "greedy")]
            assert torch.equal(r["input_ids"], ref["input_ids"])
            assert torch.allclose(r["hidden"].float(), ref["hidden"].float(), atol=1e-2)


def test_ray_train_ddp(ray_session, local_data, tmp_path):
    recipe = dataclasses.asdict(Recipe.named("time-aware", unroll=2))
    cfg = TrainConfig(data=str(local_data), target=assets.tiny_target(), out=str(tmp_path / "run"), recipe=recipe,
                      steps=10, batch_size=4, ckpt_every=5, workers=2, threads=1)
    out = train(cfg)
    spec = read_spec(out / "drafter")
    assert spec.step_bias_steps == 1 and spec.hidden_size == Manifest.load(local_data).hidden_size
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 10 and (out / "loss.png").is_file()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 10


def test_cli_errors(tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    r = subprocess.run([sys.executable, "-m", "vllm_hivis.cli", "generate-data", "--target", str(tmp_path / "llm"),
                        "--out", str(tmp_path / "d"), "--tinyworld", "train:0:2"], capture_output=True, text=True)
    assert r.returncode != 0 and "is not a vision-language model" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vllm_hivis.cli", "train", "--data", str(tmp_path / "nothing"),
                        "--target", assets.tiny_target(), "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode != 0 and "no manifest.json" in r.stderr
