"""Training pieces: examples per drafter kind, the unroll mask, the recipe, resumable training."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from vllm_hivis.method.hide import as_spans, kept_rows
from vllm_hivis.train.data import DataError, Manifest, image_spans, load_records, read_shard
from vllm_hivis.train.drafters import build_drafter, load_drafter
from vllm_hivis.train.examples import collate, make_example
from vllm_hivis.train.generate import parse_responses
from vllm_hivis.train.losses import DraftLoss, Recipe, step_mask
from vllm_hivis.train.prompts import jsonl_prompts, prompt_source, tinyworld_source
from vllm_hivis.train.target import check_target
from vllm_hivis.train.trainer import TrainConfig, frozen_target_parts, train


def record(L=20, plen=12, span=(2, 6), H=8):
    ids = torch.arange(100, 100 + L)
    ids[span[0]: span[0] + span[1]] = 4
    return {"input_ids": ids, "hidden": torch.randn(L, H), "prompt_len": plen, "spans": as_spans([span]),
            "image_embeds": torch.randn(span[1], H)}


def test_hivis_example_is_the_drop_rule():
    rec = record()
    ex = make_example(rec, "hivis")
    rows = kept_rows(rec["spans"], 19)
    assert ex["target_rows"].tolist() == rows.tolist()
    assert ex["positions"].tolist() == list(range(len(rows)))  # compressed drafter positions
    assert 4 not in ex["input_ids"].tolist()  # the drafter never reads an image placeholder
    assert torch.equal(ex["features"], rec["hidden"][rows])
    # targets: token x_{p+2}, feature h_{p+1}; loss only where x_{p+2} is an answer token
    p = torch.as_tensor(rows)
    assert ex["loss_mask"].tolist() == ((p + 2 >= 12) & (p + 2 < 20)).tolist()
    assert torch.equal(ex["target_feats"][ex["loss_mask"]], rec["hidden"][p[ex["loss_mask"]] + 1])


def test_other_kinds():
    rec = record()
    eagle = make_example(rec, "eagle")
    assert eagle["positions"].tolist() == list(range(19)) and (eagle["input_ids"] == 4).sum() == 6
    text = make_example(rec, "text")
    assert text["features"].abs().sum() == 0
    vis = make_example(rec, "vispec", num_q=3)
    assert vis["is_adaptor"].sum() == 2
    assert vis["positions"][vis["is_adaptor"]].tolist() == [6, 7]  # last 2 positions of the span [2, 8)
    assert vis["after_image"].sum() == (vis["target_rows"] >= 7).sum()
    two = dict(rec, spans=as_spans([(2, 3), (8, 2)]))
    with pytest.raises(DataError, match="has 2 images, but the ViSpec-style baseline handles one image"):
        make_example(two, "vispec")  # a user's data error, not an assert (which vanishes under -O)
    assert len(make_example(two, "hivis")["input_ids"]) > 0


def test_step_mask_matches_definition():
    valid = torch.tensor([[True] * 6 + [False]])
    for k in range(4):
        m = step_mask(valid, k)[0, 0]
        N = 7
        for i in range(N):
            for s in range(k + 1):
                for j in range(N):
                    want = (j <= i - k) if s == 0 else (j == i - k + s)
                    assert bool(m[i, s * N + j]) == (want and j < 6), (k, i, s, j)


@pytest.fixture(scope="module")
def parts(random_target):
    embed, head, cfg = frozen_target_parts(random_target)
    return embed, head, cfg["text_config"]


@pytest.mark.parametrize("kind", ["hivis", "text", "eagle", "vispec"])
def test_every_kind_trains(synthetic_dataset, parts, kind):
    embed, head, tcfg = parts
    _, recs = load_records(synthetic_dataset)
    recipe = Recipe.named("seq-embed" if kind == "eagle" else "time-aware", kind=kind, unroll=3)
    model = build_drafter(recipe, tcfg)
    assert model.kind == kind
    batch = collate([model.example(r) for r in recs[:4]])
    loss, stats = DraftLoss(model, embed, head, recipe)(batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert set(stats) >= {"ce0", "ce2", "reach2"}
    assert 0 <= stats["reach2"] <= stats["reach1"] <= stats["reach0"] == 1.0


@pytest.mark.parametrize("kind", ["hivis", "text", "eagle", "vispec"])
def test_every_kind_exports_and_loads_back(synthetic_dataset, parts, kind, tmp_path):
    """The drafter interface end to end: build, export in the kind's serving format, load_drafter
    recognises the kind and computes the same features (fp16 export: close, not equal)."""
    embed, head, tcfg = parts
    _, recs = load_records(synthetic_dataset)
    recipe = Recipe.named("seq-embed" if kind == "eagle" else "step-bias", kind=kind, unroll=2)
    torch.manual_seed(0)
    model = build_drafter(recipe, tcfg).eval()
    out = model.export(tmp_path / "d", provenance={"test": True}, target="t")
    back = load_drafter(out)
    assert back.kind == kind
    batch = collate([model.example(r) for r in recs[:2]])
    with torch.no_grad():
        feats = []
        for m in (model, back):
            emb, fuse = m.inputs(batch, embed)
            feats.append(m.core(emb, fuse(batch["features"]), batch["positions"], steps=1))
    torch.testing.assert_close(feats[0], feats[1], atol=3e-2, rtol=3e-2)


def test_kind_recipe_conflicts_fail_before_any_work(synthetic_dataset, random_target, tmp_path):
    """`train --kind eagle` with the default recipe used to train to the end and fail in export."""
    import subprocess
    import sys

    with pytest.raises(ValueError, match="no step-bias"):
        Recipe.named("time-aware", kind="eagle")
    r = subprocess.run([sys.executable, "-m", "vllm_hivis.cli", "train", "--data", synthetic_dataset, "--target",
                        random_target, "--out", str(tmp_path / "run"), "--kind", "eagle"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no step-bias residuals" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing started
    r = subprocess.run([sys.executable, "-m", "vllm_hivis.cli", "train", "--data", synthetic_dataset, "--target",
                        random_target, "--out", str(tmp_path / "run"), "--steps", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "steps must be >= 1" in r.stderr


def test_recipe_switches(synthetic_dataset, parts):
    embed, head, tcfg = parts
    _, recs = load_records(synthetic_dataset)
    batch = collate([make_example(r, "hivis") for r in recs])
    single = Recipe.named("single-step")
    torch.manual_seed(0)
    _, s1 = DraftLoss(build_drafter(single, tcfg), embed, head, single)(batch)
    assert set(k for k in s1 if k.startswith("ce")) == {"ce0"}
    sel = Recipe.named("data-selection", unroll=3)
    torch.manual_seed(0)
    _, s3 = DraftLoss(build_drafter(sel, tcfg), embed, head, sel)(batch)
    # an untrained drafter is rarely right, so few chains survive selection to step 2
    assert s3["reach2"] < 0.5 and abs(s3["ce0"] - s1["ce0"]) < 1e-5
    assert Recipe.named("step-bias").step_bias and not Recipe.named("seq-embed").step_bias
    with pytest.raises(ValueError, match="unknown recipe"):
        Recipe.named("magic")


def cfg(data, target, out, **kw):
    r = dataclasses.asdict(Recipe.named("step-bias", unroll=2))
    return TrainConfig(data=data, target=target, out=str(out), recipe=r, steps=12, batch_size=4, ckpt_every=4, **kw)


def test_resumed_run_continues_where_it_stopped(synthetic_dataset, random_target, tmp_path):
    train(cfg(synthetic_dataset, random_target, tmp_path / "straight"))
    c = cfg(synthetic_dataset, random_target, tmp_path / "resumed", stop_after=5)
    train(c)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 5
    assert not (tmp_path / "resumed" / "drafter").exists()
    train(dataclasses.replace(c, stop_after=None))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "drafter" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "drafter" / "model.safetensors"))
    assert a.keys() == b.keys() and "step_bias" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10]
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 1000


def test_data_errors(synthetic_dataset, random_target, tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        train(cfg(str(tmp_path), random_target, tmp_path / "run"))
    empty = tmp_path / "empty"
    empty.mkdir()
    m = Manifest.load(synthetic_dataset)
    m.shards = []
    m.save(empty)
    with pytest.raises(DataError, match="is empty"):
        load_records(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    m = Manifest.load(synthetic_dataset)
    m.tokenizer = "0000"
    m.save(bad)
    for s in m.shards:
        (bad / s["file"]).write_bytes(open(f"{synthetic_dataset}/{s['file']}", "rb").read())
    with pytest.raises(DataError, match="another tokenizer"):
        train(cfg(str(bad), random_target, tmp_path / "run2"))
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(DataError, match="is not a vision-language model"):
        check_target(str(tmp_path / "llm"))


def test_sources_and_storage(synthetic_dataset, tmp_path):
    assert image_spans([1, 2, 4, 4, 4, 5, 4, 4, 6], 4).tolist() == [[2, 3], [6, 2]]
    assert parse_responses("greedy,sample:0.7x2") == [{"mode": "greedy", "temperature": 0.0, "n": 1},
                                                      {"mode": "sample", "temperature": 0.7, "n": 2}]
    with pytest.raises(DataError, match="unknown response mode"):
        parse_responses("beam")
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "hi"}\n{"image": "missing.png", "prompt": "x"}\n')
    with pytest.raises(DataError, match="not found"):
        jsonl_prompts(p)
    p.write_text("not json\n")
    with pytest.raises(DataError, match="expected a JSON object"):
        jsonl_prompts(p)
    recs = read_shard(f"{synthetic_dataset}/shard-00000.safetensors")
    assert len(recs) == 6 and recs[0]["hidden"].dtype == torch.float16
    assert recs[0]["hidden"].shape[0] == len(recs[0]["input_ids"]) and np.all(recs[0]["spans"][:, 1] == 9)


def test_shards_keep_a_bf16_targets_hidden_states_exactly(synthetic_dataset, tmp_path):
    """Hidden states are stored in the dtype the target was served in when it is half precision
    (a bf16 target's values beyond fp16's range or precision survive the round trip bit for bit);
    wider ones (the fp32 CPU testbed) are stored as fp16."""
    from vllm_hivis.train.data import write_shard

    rec = dict(read_shard(f"{synthetic_dataset}/shard-00000.safetensors")[0])
    big = torch.randn(rec["hidden"].shape) * 1e5  # beyond fp16's 65504
    rec["hidden"], rec["image_embeds"] = big.bfloat16(), rec["image_embeds"].bfloat16()
    write_shard(tmp_path / "bf16.safetensors", [rec])
    back = read_shard(tmp_path / "bf16.safetensors")[0]
    assert back["hidden"].dtype == torch.bfloat16 and torch.equal(back["hidden"], big.bfloat16())
    assert torch.isfinite(back["hidden"].float()).all()
    rec["hidden"] = big.clamp(-6e4, 6e4)  # fp32
    write_shard(tmp_path / "fp32.safetensors", [rec])
    assert read_shard(tmp_path / "fp32.safetensors")[0]["hidden"].dtype == torch.float16


def test_data_generation_actors_ask_for_a_gpu_where_there_is_one(monkeypatch):
    from vllm_hivis.train.generate import default_worker_resources

    assert default_worker_resources() == {"num_cpus": 1}  # this CPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_worker_resources() == {"num_gpus": 1}


def test_evaluation_between_training_runs(synthetic_dataset, random_target, tmp_path):
    """The ablation trains, evaluates, trains again: evaluation must not leave grad mode off."""
    from vllm_hivis.train.evaluate import evaluate

    train(cfg(synthetic_dataset, random_target, tmp_path / "a"))
    size = json.loads(open(f"{random_target}/config.json").read())["vision_config"]["image_size"]
    items = prompt_source(tinyworld_source("test:0:1", size, "describe"))
    acc, outs = evaluate(random_target, str(tmp_path / "a" / "drafter"), items, k=2, max_tokens=6, progress=False)
    assert len(outs) == 1 and 1 <= len(outs[0]) <= 6 and acc.num_drafts >= 1
    assert torch.is_grad_enabled()
    train(cfg(synthetic_dataset, random_target, tmp_path / "b"))  # raised "does not require grad" before


def test_shard_stream_bounds_memory_and_is_a_function_of_the_step(synthetic_dataset, tmp_path):
    """At most `resident` shards in memory; every shard visited; the batch of step s the same
    whatever came before (resume); ranks draw disjoint records."""
    from vllm_hivis.train.stream import ShardStream

    # six one-record-wide shards out of the two of the fixture (3 records each)
    man = Manifest.load(synthetic_dataset)
    recs = load_records(synthetic_dataset)[1]
    out = tmp_path / "six"
    out.mkdir()
    from vllm_hivis.train.data import write_shard

    man.shards = []
    for i in range(6):
        f = f"shard-{i:05d}.safetensors"
        man.shards.append({"file": f, "samples": 2, "bytes": write_shard(out / f, recs[2 * i:2 * i + 2])})
    man.save(out)
    s = ShardStream(str(out), man, batch_size=2, seed=3, resident=2)
    seen = set()
    for step in range(40):
        seen |= {r["id"] for r in s.batch(step)}
        assert len(s._cache) <= 2
    assert seen == {r["id"] for r in recs}  # every record drawn, two shards at a time
    fresh = ShardStream(str(out), man, batch_size=2, seed=3, resident=2)
    assert [r["id"] for r in fresh.batch(37)] == [r["id"] for r in s.batch(37)]  # resume-safe
    assert s.bound_bytes == 2 * max(sh["bytes"] for sh in man.shards)
    a = {r["id"] for st in range(40) for r in ShardStream(str(out), man, 2, 3, rank=0, world=2).batch(st)}
    b = {r["id"] for st in range(40) for r in ShardStream(str(out), man, 2, 3, rank=1, world=2).batch(st)}
    assert a and b and not a & b and a | b == seen
    assert recs[0]["hidden"].dtype == torch.float16  # held as stored, not upcast


def test_devices(monkeypatch):
    from vllm_hivis.train.trainer import resolve_device, to_device

    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda:0")
    b = to_device({"x": torch.ones(2), "n": 3}, torch.device("meta"))
    assert b["x"].device.type == "meta" and b["n"] == 3


def test_data_generation_never_holds_two_targets(random_target, tmp_path, monkeypatch):
    """Phase 1 (vLLM answers) closes its engine before phase 2 (transformers hidden states) loads
    the target: one device never holds two copies (a 7B target at 0.9 memory utilisation would not
    fit twice). Each phase resumes: a second run redoes nothing."""
    from vllm_hivis.train import generate

    events, alive = [], {"answer": 0, "hidden": 0}

    class FakeAnswer:
        def __init__(self, target_dir, responses, max_tokens=160, seed=0):
            assert alive["hidden"] == 0
            alive["answer"] += 1
            events.append("answer up")

        def run(self, task):
            (tmp_path / "d" / generate.answers_file(task)).write_text(json.dumps({"dtype": "float32", "answers": []}))

        def close(self):
            alive["answer"] -= 1
            events.append("answer down")

    class FakeHidden:
        def __init__(self, target_dir, feature_layers=()):
            assert alive["answer"] == 0, "the vLLM engine is still alive"
            alive["hidden"] += 1
            events.append("hidden up")

        def run(self, task):
            (tmp_path / "d" / generate.answers_file(task)).unlink()
            path = tmp_path / "d" / task["file"]
            path.write_bytes(b"x")
            return {"file": task["file"], "samples": 0, "bytes": 1}

    monkeypatch.setattr(generate, "AnswerWorker", FakeAnswer)
    monkeypatch.setattr(generate, "HiddenWorker", FakeHidden)
    size = json.loads(open(f"{random_target}/config.json").read())["vision_config"]["image_size"]
    src = tinyworld_source("train:0:5", size)
    man = generate.generate_dataset(random_target, str(tmp_path / "d"), src, parse_responses("greedy"), shard_size=2)
    assert events == ["answer up", "answer down", "hidden up"] and len(man.shards) == 3
    events.clear()
    generate.generate_dataset(random_target, str(tmp_path / "d"), src, parse_responses("greedy"), shard_size=2)
    assert events == []  # everything done: no worker started


@pytest.mark.parametrize("cli,argv,words", [
    ("generate", ["--shard-size", "0"], "--shard-size must be >= 1"),
    ("generate", ["--workers", "-1"], "--workers must be >= 0"),
    ("generate", ["--tinyworld", "train:0"], "expects SPLIT:START:COUNT"),
    ("generate", ["--tinyworld", "holdout:0:5"], "split must be one of"),
    ("generate", ["--prompt-kind", "poem"], "prompt kind 'poem' unknown"),
    ("generate", ["--responses", "beam"], "unknown response mode 'beam'"),
    ("generate", ["--feature-layers", "1"], "the target has 1 decoder layers"),  # the random target: 1 layer
    ("generate", ["--feature-layers", "a,b"], "comma-separated layer indices"),
    ("evaluate", ["-k", "0"], "-k must be in 1..32"),
    ("evaluate", ["--drafter", "/nonexistent"], "does not exist"),
    ("evaluate", ["--prompt-kind", "poem"], "prompt kind 'poem' unknown"),
    ("evaluate", ["--jsonl", "/nonexistent/prompts.jsonl"], "does not exist"),
])
def test_cli_inputs_are_checked_before_any_work(random_target, tmp_path, cli, argv, words):
    """Every CLI input problem stops the command before a model is loaded or a file written."""
    from vllm_hivis.train import evaluate, generate

    base = {"generate": ["--target", random_target, "--out", str(tmp_path / "d"), "--tinyworld", "train:0:4"],
            "evaluate": ["--target", random_target, "--drafter", assets_drafter(), "--tinyworld", "test:0:2"]}[cli]
    merged = dict(zip(base[::2], base[1::2])) | dict(zip(argv[::2], argv[1::2]))
    if "--jsonl" in merged:  # one prompt source at a time
        merged.pop("--tinyworld")
    main = {"generate": generate.main, "evaluate": evaluate.main}[cli]
    with pytest.raises(SystemExit) as err:
        main([x for kv in merged.items() for x in kv])
    assert words in str(err.value)
    assert not (tmp_path / "d").exists()


def assets_drafter():
    from hivis_testbed import assets

    return assets.tiny_drafter()


def test_gpu_check_script_runs_the_trainer_and_learns(tmp_path):
    """scripts/gpu_check.py (the device check) at tiny shapes on the CPU: the real trainer path on
    its synthetic world learns (step-0 loss falls, top-1 agreement > 0.5); the CUDA-graph part
    says it was skipped rather than passing vacuously."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    t = res["training"]
    assert t["loss_fell"] and t["exported"] and t["ce0_last"] < t["ce0_first"] and t["acc0_last"] > 0.5
    assert res["graph"]["skipped"] == "no CUDA device"
    assert (tmp_path / "gpu_check.md").is_file()


def test_evaluate_reads_a_users_jsonl_prompts(tmp_path):
    """`vllm-hivis evaluate --jsonl`: the prompt file format generate-data reads (an image prompt
    with a relative path, a text-only prompt), replayed with the shipped tiny models."""
    from hivis_testbed import assets
    from hivis_testbed.tinyworld.dataset import sample
    from vllm_hivis.train import evaluate

    size = json.loads(open(f"{assets.tiny_target()}/config.json").read())["vision_config"]["image_size"]
    sample("test", 5, size, kind="describe").image.save(tmp_path / "scene.png")
    rows = [{"image": "scene.png", "prompt": "Describe the image in detail."},
            {"image": None, "prompt": "How many shapes are there?"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "acc.json"
    evaluate.main(["--target", assets.tiny_target(), "--drafter", assets.tiny_drafter(), "--jsonl",
                   str(tmp_path / "p.jsonl"), "-k", "3", "--max-tokens", "24", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["prompts"] == str(tmp_path / "p.jsonl") and res["k"] == 3
    assert res["drafts"] > 0 and res["accepted"] > 0  # the shipped drafter drafts well on a tiny-world scene
