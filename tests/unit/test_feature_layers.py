"""Multi-layer hivis drafters (``feature_layers``): recording, the format contract, training, and
every refusal naming what was wrong (vLLM parity: tests/e2e/test_parity.py)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.conftest import make_random_llava
from vllm_hivis.method.checkpoint import DrafterFormatError, DrafterSpec, read_spec
from vllm_hivis.method.hide import kept_rows
from vllm_hivis.train.data import (
    DataError,
    Manifest,
    compact_layers,
    expand_layers,
    image_spans,
    load_records,
    tokenizer_fingerprint,
    write_shard,
)
from vllm_hivis.train.drafters import build_drafter, load_drafter
from vllm_hivis.train.examples import collate
from vllm_hivis.train.losses import DraftLoss, Recipe
from vllm_hivis.train.trainer import TrainConfig, frozen_target_parts, preflight

LAYERS = [1, 3]  # of a 3-layer target: one intermediate layer and the final normed state
FULL: list[torch.Tensor] = []  # the layer_dataset records' layers at every row, as recorded


@pytest.fixture(scope="module")
def target3(tmp_path_factory):
    return make_random_llava(tmp_path_factory.mktemp("llava-3-layers"), text_layers=3, seed=1)


@pytest.fixture(scope="module")
def layer_dataset(target3, tmp_path_factory):
    """A dataset recorded the way generate-data records it (HFTarget.hidden_states with layers)."""
    from hivis_testbed.tinyworld.batches import answer_ids, prompt_ids
    from hivis_testbed.tinyworld.dataset import sample
    from vllm_hivis.train.target import HFTarget

    out = tmp_path_factory.mktemp("layer-data")
    t = HFTarget(target3)
    cfg = t.config
    n_img = cfg["image_seq_length"]
    recs = []
    for i in range(6):
        s = sample("train", i, 42)
        p = prompt_ids(t.processor.tokenizer, s.qa.question, n_img)
        ids = torch.tensor(p + answer_ids(t.processor.tokenizer, s.qa.answer))
        hidden, img, layers = t.hidden_states(ids, s.image, (1, 2))
        spans = image_spans(p, t.image_token_id)
        recs.append({"id": str(i), "kind": s.qa.kind, "mode": "greedy", "input_ids": ids, "prompt_len": len(p),
                     "spans": spans, "hidden": hidden, "image_embeds": img,
                     "layers": compact_layers(layers, spans), "feature_layers": (1, 2), "full_layers": layers})
    man = Manifest(target=target3, tokenizer=tokenizer_fingerprint(target3), hidden_size=cfg["text_config"]
                   ["hidden_size"], vocab_size=cfg["text_config"]["vocab_size"], image_token_id=t.image_token_id,
                   source={"kind": "synthetic"}, responses=[{"mode": "greedy"}], feature_layers=[1, 2])
    FULL.extend(r.pop("full_layers") for r in recs)
    man.shards.append({"file": "shard-00000.safetensors", "samples": len(recs),
                       "bytes": write_shard(out / "shard-00000.safetensors", recs)})
    man.save(out)
    return str(out)


def test_recorded_layers_are_the_targets_residual_stream(target3, layer_dataset):
    """Index i < L is transformers' hidden_states[i] (after i decoder layers, before the norm: what
    vLLM's auxiliary hidden state i is), index L the final normed state; shards keep them."""
    from vllm_hivis.train.target import HFTarget

    t = HFTarget(target3)
    ids = torch.tensor([1, 5, 9, 12, 40])
    hidden, _, layers = t.hidden_states(ids, None, (1, 2, 3))
    with torch.no_grad():
        ref = t.hf.model(input_ids=ids[None], output_hidden_states=True).hidden_states
    assert layers.shape == (5, 3, hidden.shape[1])
    for j, i in enumerate((1, 2)):
        torch.testing.assert_close(layers[:, j], ref[i][0])
    torch.testing.assert_close(layers[:, 2], hidden)  # the final layer is the normed last hidden state
    assert not torch.allclose(layers[:, 0], layers[:, 1])
    with pytest.raises(DataError, match=r"out of range.*3 decoder layers"):
        t.hidden_states(ids, None, (4,))
    man, recs = load_records(layer_dataset)
    assert man.feature_layers == [1, 2]
    kept = kept_rows(recs[0]["spans"], len(recs[0]["input_ids"]) - 1)
    assert len(kept) < len(recs[0]["input_ids"]) - 9  # the image rows (but the last) are not stored
    assert recs[0]["feature_layers"] == (1, 2) and recs[0]["layers"].shape == (len(kept), 2, 64)
    assert recs[0]["layers"].dtype == torch.float16  # stored like the hidden states
    full = expand_layers(recs[0]["layers"], recs[0]["spans"], len(recs[0]["input_ids"]))
    torch.testing.assert_close(full[kept].float(), FULL[0][kept], atol=1e-2, rtol=1e-3)  # fp16 storage
    assert full[~np.isin(np.arange(len(full)), kept)].abs().sum() == 0
    with pytest.raises(DataError, match="dataset is corrupt"):
        expand_layers(recs[0]["layers"][:-1], recs[0]["spans"], len(recs[0]["input_ids"]))


def test_generate_data_checks_the_layers_it_is_asked_for(target3):
    from vllm_hivis.train.generate import parse_feature_layers

    assert parse_feature_layers("2,1,2", target3) == [1, 2]
    assert parse_feature_layers("", target3) == []
    with pytest.raises(DataError, match=r"out of range.*intermediate layers are 1\.\.2"):
        parse_feature_layers("1,3", target3)  # the final layer is always recorded as the hidden state
    with pytest.raises(DataError, match="comma-separated layer indices"):
        parse_feature_layers("1;2", target3)


def test_a_multi_layer_drafter_trains_exports_and_loads_back(target3, layer_dataset, tmp_path):
    embed, head, cfg = frozen_target_parts(target3)
    _, recs = load_records(layer_dataset)
    recipe = dataclasses.replace(Recipe.named("time-aware", unroll=3), feature_layers=LAYERS).checked()
    torch.manual_seed(0)
    model = build_drafter(recipe, cfg["text_config"])
    assert model.spec.feature_layers == LAYERS and model.spec.num_target_layers == 3
    ex = model.example(recs[0])
    H = 64
    assert ex["features"].shape == (len(ex["input_ids"]), 2 * H)
    rows = ex["target_rows"]
    torch.testing.assert_close(ex["features"][:, :H], FULL[0][rows, 0], atol=1e-2, rtol=1e-3)  # layer 1
    torch.testing.assert_close(ex["features"][:, H:], recs[0]["hidden"][rows].float())  # the final layer
    # combine: feature_fc over [rms(layer 1); final], checkpoint.py's formula
    a = ex["features"][:, :H]
    want = model.feature_fc(torch.cat([a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5), ex["features"][:, H:]],
                                      -1))
    torch.testing.assert_close(model.combine_features(ex["features"]), want)
    batch = collate([model.example(r) for r in recs[:4]])
    loss, _ = DraftLoss(model, embed, head, recipe)(batch)
    loss.backward()
    assert model.feature_fc.weight.grad.abs().sum() > 0
    out = model.export(tmp_path / "d", target=target3)
    c = json.loads((out / "config.json").read_text())
    assert c["eagle_aux_hidden_state_layer_ids"] == LAYERS  # vLLM's key: its runners collect these layers
    assert read_spec(out).feature_layers == LAYERS
    back = load_drafter(out)
    with torch.no_grad():
        torch.testing.assert_close(back.combine_features(ex["features"]), model.combine_features(ex["features"]),
                                   atol=2e-2, rtol=2e-2)  # fp16 export


@pytest.fixture(scope="module")
def ml_drafter_dir(target3, tmp_path_factory):
    _, _, cfg = frozen_target_parts(target3)
    recipe = dataclasses.replace(Recipe.named("step-bias", unroll=2), feature_layers=LAYERS).checked()
    return build_drafter(recipe, cfg["text_config"]).export(tmp_path_factory.mktemp("ml"), target=target3)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["hivis"].update(feature_layers=[3, 1]), "sorted list of distinct"),
    (lambda c: c["hivis"].update(feature_layers=[1, 4]), r"indices in 1\.\.3"),
    (lambda c: c["hivis"].update(feature_layers=[0, 3]), r"indices in 1\.\.3"),
    (lambda c: c["hivis"].update(num_target_layers=None), "needs num_target_layers"),
    (lambda c: c["hivis"].update(uses_target_features=False), "text-only drafter"),
    (lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 2]), "disagrees with the 'hivis' block"),
    (lambda c: c.pop("eagle_aux_hidden_state_layer_ids"), "disagrees with the 'hivis' block"),
    (lambda c: c["hivis"].update(feature_layers=[1, 2, 3]), r"feature_fc.weight has shape \[64, 128\].*\[64, 192\]"),
])
def test_drafter_format_refuses_inconsistent_feature_layers(ml_drafter_dir, tmp_path, edit, match):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(ml_drafter_dir, d)
    c = json.loads((d / "config.json").read_text())
    edit(c)
    if c.get("eagle_aux_hidden_state_layer_ids") is not None and "disagrees" not in match:
        c["eagle_aux_hidden_state_layer_ids"] = c["hivis"]["feature_layers"]  # keep the two in step
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(DrafterFormatError, match=match):
        read_spec(d)


def test_serving_refuses_a_drafter_made_for_another_depth(ml_drafter_dir):
    import types

    from vllm_hivis.serving.config import HiViSConfigError, check_against_target

    spec = read_spec(ml_drafter_dir)
    target = types.SimpleNamespace(model="t", is_multimodal_model=True, uses_mrope=False, tokenizer=None,
                                   get_hidden_size=lambda: 64, get_vocab_size=lambda: spec.vocab_size,
                                   get_total_num_hidden_layers=lambda: 32)
    with pytest.raises(HiViSConfigError, match=r"fuses target layers \[1, 3\] of a 3-layer target.*has 32"):
        check_against_target(spec, {"model": ml_drafter_dir}, target)
    target.get_total_num_hidden_layers = lambda: 3
    check_against_target(spec, {"model": ml_drafter_dir}, target)  # the depth it was made for
    # vLLM's class for the target must return intermediate layers (LLaVA does; LLaVA-NeXT does not in 0.32)
    for arch, ok in (("LlavaForConditionalGeneration", True), ("LlavaNextForConditionalGeneration", False)):
        t = types.SimpleNamespace(**vars(target), architectures=[arch], model_impl="auto", runner_type="generate",
                                  convert_type="none")
        if ok:
            check_against_target(spec, {"model": ml_drafter_dir}, t)
        else:
            with pytest.raises(HiViSConfigError, match="LlavaNextForConditionalGeneration cannot return"):
                check_against_target(spec, {"model": ml_drafter_dir}, t)


def test_training_refuses_layers_the_data_or_the_kind_cannot_give(target3, layer_dataset, tmp_path):
    import shutil

    def cfg(data, layers, kind="hivis"):
        r = dataclasses.asdict(Recipe.named("seq-embed", kind=kind, unroll=2))
        return TrainConfig(data=str(data), target=target3, out=str(tmp_path / "r"),
                           recipe={**r, "feature_layers": layers})

    preflight(cfg(layer_dataset, [1, 2, 3]))
    only1 = tmp_path / "only1"  # the same records, listed as recorded at layer 1 only
    shutil.copytree(layer_dataset, only1)
    m = json.loads((only1 / "manifest.json").read_text())
    (only1 / "manifest.json").write_text(json.dumps({**m, "feature_layers": [1]}))
    with pytest.raises(DataError, match=r"did not record target layers \[2\].*--feature-layers 1,2`"):
        preflight(cfg(only1, [1, 2, 3]))
    with pytest.raises(ValueError, match="go beyond the target's 3 decoder layers"):
        preflight(cfg(layer_dataset, [1, 4]))
    with pytest.raises(ValueError, match="feature layers are a hivis drafter option"):
        preflight(cfg(layer_dataset, [1, 3], kind="eagle"))


def test_examples_name_the_missing_layer(layer_dataset):
    from vllm_hivis.train.examples import make_example

    _, recs = load_records(layer_dataset)
    rec = dict(recs[0], layers=None, feature_layers=())
    with pytest.raises(DataError, match=r"reads target layer 1.*only the final layer.*--feature-layers 1"):
        make_example(rec, "hivis", feature_layers=[1, 3], num_target_layers=3)


def test_a_drafter_spec_without_layers_is_unchanged():
    s = DrafterSpec(hidden_size=8, vocab_size=10)
    assert s.feature_layers is None and s.num_feature_layers == 1
    assert "feature_layers" in s.to_json() and s.to_json()["feature_layers"] is None


@pytest.mark.parametrize("argv,words", [
    (["--feature-layers", "x"], "comma-separated layer indices"),
    (["--feature-layers", "1,5"], "go beyond the target's 3 decoder layers"),
    (["--feature-layers", "1,3", "--kind", "text"], "feature layers are a hivis drafter option"),
    (["--feature-layers", "3,1"], "distinct positive layer indices"),
])
def test_train_cli_checks_feature_layers_before_any_work(target3, layer_dataset, tmp_path, argv, words):
    from vllm_hivis.train import trainer

    with pytest.raises(SystemExit) as err:
        trainer.main(["--data", layer_dataset, "--target", target3, "--out", str(tmp_path / "run"), *argv])
    assert words in str(err.value)
    assert not (tmp_path / "run").exists()
