"""Shared fixtures: small models made at test time (never committed, never downloaded)."""

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_random_llava(out_dir, image_size=42, text_hidden=64, text_layers=1, seed=0):
    """A random-weight tiny LLaVA with the tiny world's tokenizer (9 image tokens at 42 px)."""
    from transformers import LlavaForConditionalGeneration

    from hivis_testbed.tinyworld import build

    torch.manual_seed(seed)
    tok = build.train_tokenizer(num_texts=300)
    cfg = build.make_config(len(tok), image_size=image_size, vision_hidden=32, vision_layers=1,
                            text_hidden=text_hidden, text_layers=text_layers, text_heads=4, text_ffn=128)
    model = LlavaForConditionalGeneration(cfg).eval()
    build.save_llava(model, build.make_processor(tok, image_size), out_dir, dtype=torch.float32)
    return str(out_dir)


@pytest.fixture(scope="session")
def random_target(tmp_path_factory):
    return make_random_llava(tmp_path_factory.mktemp("random-llava"))


@pytest.fixture(scope="session")
def synthetic_dataset(random_target, tmp_path_factory):
    """A drafter dataset in the real on-disk format, with random hidden states (no vLLM needed)."""
    from transformers import AutoTokenizer

    from hivis_testbed.tinyworld.batches import answer_ids, prompt_ids
    from hivis_testbed.tinyworld.dataset import sample
    from vllm_hivis.train.data import Manifest, image_spans, tokenizer_fingerprint, write_shard

    out = tmp_path_factory.mktemp("dataset")
    cfg = json.loads(open(f"{random_target}/config.json").read())
    H, n_img = cfg["text_config"]["hidden_size"], cfg["image_seq_length"]
    tok = AutoTokenizer.from_pretrained(random_target)
    g = torch.Generator().manual_seed(0)
    man = Manifest(target=random_target, tokenizer=tokenizer_fingerprint(random_target), hidden_size=H,
                   vocab_size=cfg["text_config"]["vocab_size"], image_token_id=cfg["image_token_index"],
                   source={"kind": "synthetic"}, responses=[{"mode": "greedy"}])
    for shard in range(2):
        recs = []
        for i in range(6):
            s = sample("train", shard * 6 + i, 42)
            p = prompt_ids(tok, s.qa.question, n_img)
            ids = p + answer_ids(tok, s.qa.answer)
            recs.append({"id": f"{shard}-{i}", "kind": s.qa.kind, "mode": "greedy", "input_ids": torch.tensor(ids),
                         "prompt_len": len(p), "spans": image_spans(p, cfg["image_token_index"]),
                         "hidden": torch.randn(len(ids), H, generator=g),
                         "image_embeds": torch.randn(n_img, H, generator=g)})
        f = f"shard-{shard:05d}.safetensors"
        man.shards.append({"file": f, "samples": len(recs), "bytes": write_shard(out / f, recs)})
    man.save(out)
    return str(out)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
