"""Target-generated drafter training data: records of the target's answers and hidden states, in shards.

A record is one (prompt, answer) pair:
    input_ids     [L] int32   the target's full sequence: prompt (image placeholders expanded) + answer
    hidden        [L, H] fp16 the target's last-layer hidden states after the final norm: exactly the
                              tensor vLLM hands the proposer (a parity test checks this)
    image_embeds  [N, H] fp16 the projected image features at the N placeholder rows (for drafters
                              that see images: the EAGLE and ViSpec-style baselines)
    layers        [K, n, H]   optional (``generate-data --feature-layers``): the target's states at the
                              dataset's ``feature_layers`` (target.py's indices: i < n_layers is the
                              residual stream after i decoder layers, n_layers the final normed state),
                              for multi-layer drafters; stored only for layers other than the final one,
                              and only at the K rows a hivis drafter reads (hide.kept_rows(spans, L - 1):
                              no image rows but each image's last: 20% of a tiny-world record's rows).
                              `expand_layers` gives them back at all L rows (zeros elsewhere).
    prompt_len    int         answer tokens start here
    spans         [S, 2]      image placeholder spans (offset, length) in the prompt
Answers come from vLLM (greedy and/or sampled); hidden states from a transformers forward pass of
the same target on prompt + answer (teacher forcing).

Records are stored in shards (``shard-00000.safetensors``: records concatenated, with offset
tables) plus ``manifest.json``; a shard file appears atomically when complete, so generation
resumes by skipping shards that exist.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..method.checkpoint import tokenizer_fingerprint  # noqa: F401  (re-exported: data carries it)

HIDDEN_CONVENTION = "last-layer hidden state after the final norm, at every target position"


class DataError(ValueError):
    """Bad training data or data source (message says what and what is expected)."""


def image_spans(prompt_ids: list[int], image_token_id: int) -> np.ndarray:
    """[S, 2] runs of the image placeholder id in a prompt (LLaVA's placeholders are exactly these
    runs; the proposer reads the same spans from vLLM's multimodal placeholder ranges)."""
    ids = np.asarray(prompt_ids)
    is_img = np.concatenate([[False], ids == image_token_id, [False]])
    edges = np.flatnonzero(is_img[1:] != is_img[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).astype(np.int64) if len(starts) else np.zeros((0, 2), np.int64)


# -- shard storage --------------------------------------------------------------------------
def storage_dtype(recorded: torch.dtype) -> torch.dtype:
    """The dtype a shard stores hidden states and image features in: a half-precision target's
    own dtype, exactly (llava-1.5 serves in fp16, many newer VLMs in bf16: a bf16 -> fp16 cast
    would overflow beyond 65504 and round differently); wider ones (fp32, the CPU testbed) as fp16,
    half the disk and twice the records per resident shard."""
    return torch.bfloat16 if recorded == torch.bfloat16 else torch.float16


def write_shard(path: Path, records: list[dict]) -> int:
    """Write records atomically; returns bytes written. Raises DataError on a full disk."""
    if not records:
        raise DataError(f"refusing to write empty shard {path}")
    cat = lambda k, dt: torch.cat([torch.as_tensor(r[k]).to(dt) for r in records])  # noqa: E731
    lens = torch.tensor([len(r["input_ids"]) for r in records], dtype=torch.int64)
    n_img = torch.tensor([len(r["image_embeds"]) for r in records], dtype=torch.int64)
    n_spans = torch.tensor([len(r["spans"]) for r in records], dtype=torch.int64)
    H = records[0]["hidden"].shape[1]
    dt = storage_dtype(torch.as_tensor(records[0]["hidden"]).dtype)
    tensors = {
        "input_ids": cat("input_ids", torch.int32), "hidden": cat("hidden", dt),
        **({"layers": cat("layers", dt),
            "layer_rows": torch.tensor([len(r["layers"]) for r in records], dtype=torch.int64)}
           if records[0].get("layers") is not None else {}),
        "image_embeds": torch.cat([torch.as_tensor(r["image_embeds"]).reshape(-1, H).to(dt) for r in records]),
        "spans": torch.cat([torch.as_tensor(r["spans"]).reshape(-1, 2).to(torch.int64) for r in records]),
        "lengths": lens, "image_rows": n_img, "num_spans": n_spans,
        "prompt_len": torch.tensor([r["prompt_len"] for r in records], dtype=torch.int64),
    }
    meta = {"ids": json.dumps([r["id"] for r in records]), "kinds": json.dumps([r.get("kind", "") for r in records]),
            "modes": json.dumps([r.get("mode", "") for r in records]),
            "feature_layers": json.dumps(list(records[0].get("feature_layers", ())))}
    tmp = path.with_suffix(".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DataError(f"disk full while writing {path}; free space on {path.parent} or pass another "
                            "--out") from None
        raise
    return path.stat().st_size


def read_shard(path: str | os.PathLike) -> list[dict]:
    from safetensors import safe_open

    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    ids, kinds, modes = (json.loads(meta[k]) for k in ("ids", "kinds", "modes"))
    layer_ids = tuple(json.loads(meta.get("feature_layers", "[]")))
    split = lambda x, n: torch.split(x, n.tolist())  # noqa: E731
    layers = split(t["layers"], t.get("layer_rows", t["lengths"])) if "layers" in t else [None] * len(ids)
    cols = zip(ids, kinds, modes, split(t["input_ids"], t["lengths"]), split(t["hidden"], t["lengths"]),
               split(t["image_embeds"], t["image_rows"]), split(t["spans"], t["num_spans"]), t["prompt_len"], layers)
    return [dict(id=i, kind=k, mode=m, input_ids=a, hidden=h, image_embeds=e, spans=s.numpy(), prompt_len=int(p),
                 layers=x, feature_layers=layer_ids) for i, k, m, a, h, e, s, p, x in cols]


def compact_layers(layers: torch.Tensor, spans: np.ndarray) -> torch.Tensor:
    """[L, n, H] -> [K, n, H]: the rows a hivis drafter reads (see the module docstring)."""
    from ..method.hide import kept_rows

    return layers[torch.from_numpy(kept_rows(spans, len(layers) - 1))]


def expand_layers(layers: torch.Tensor, spans: np.ndarray, length: int) -> torch.Tensor:
    """A record's layers at all `length` rows: [K, n, H] compacted (zeros at the rows no hivis
    drafter reads) or [length, n, H] as they are."""
    if len(layers) == length:
        return layers
    from ..method.hide import kept_rows

    rows = torch.from_numpy(kept_rows(spans, length - 1))
    if len(rows) != len(layers):
        raise DataError(f"a record holds {len(layers)} layer rows, its spans and length imply {len(rows)} kept rows "
                        f"(or {length}); the dataset is corrupt: regenerate it")
    out = layers.new_zeros(length, *layers.shape[1:])
    out[rows] = layers
    return out


@dataclasses.dataclass
class Manifest:
    target: str
    tokenizer: str
    hidden_size: int
    vocab_size: int
    image_token_id: int
    convention: str = HIDDEN_CONVENTION
    source: dict = dataclasses.field(default_factory=dict)
    responses: list = dataclasses.field(default_factory=list)
    feature_layers: list = dataclasses.field(default_factory=list)  # layers recorded besides the final one
    shards: list = dataclasses.field(default_factory=list)  # [{"file", "samples", "bytes"}]

    def save(self, out_dir: Path) -> None:
        tmp = out_dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        os.replace(tmp, out_dir / "manifest.json")

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> Manifest:
        p = Path(data_dir) / "manifest.json"
        if not p.is_file():
            raise DataError(f"{data_dir} is not a drafter dataset (no manifest.json); make one with "
                            "`vllm-hivis generate-data`")
        return cls(**json.loads(p.read_text()))

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards)


def load_records(data_dir: str | os.PathLike, limit: int | None = None) -> tuple[Manifest, list[dict]]:
    m = Manifest.load(data_dir)
    recs: list[dict] = []
    for s in m.shards:
        recs += read_shard(Path(data_dir) / s["file"])
        if limit is not None and len(recs) >= limit:
            return m, recs[:limit]
    if not recs:
        raise DataError(f"dataset {data_dir} is empty (its manifest lists no samples); generate data first")
    return m, recs
