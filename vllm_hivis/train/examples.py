"""Drafter training examples: what each kind of drafter sees of one target record.

Rows follow vLLM's EAGLE convention: row p pairs the target feature h_p with the next token
x_{p+1}; its targets are the token x_{p+2} and the target feature h_{p+1}. Kinds:

  hivis   the rows hide.py keeps (input tokens are text only), drafter positions 0..N-1: exactly
          what HiViSProposer feeds the drafter in vLLM (parity-tested)
  text    the same rows and positions, but no target features (a text-only drafter)
  eagle   every row, image rows included (their input token is the image placeholder id, as in
          vLLM's EAGLE with a text-only head), original positions: vLLM's built-in "eagle"
  vispec  hivis rows at original positions, plus the image compressed to `num_q - 1` adaptor rows
          at the end of its span (ViSpec-style; see baselines.py)

Loss rows: the target token x_{p+2} is an answer token. Anchor rows (where an unrolled drafting
chain may start): p >= prompt_len - 1, i.e. the last prompt row or later.
"""

from __future__ import annotations

import torch

from ..method.checkpoint import intermediate_layers
from ..method.hide import kept_rows

KINDS = ("hivis", "text", "eagle", "vispec")
IGNORE = -100


def layer_features(rec: dict, feature_layers: list[int], num_target_layers: int) -> torch.Tensor:
    """[L, n*H] a record's target states at `feature_layers` (checkpoint.py's indices), in that order:
    intermediate layers from the record's ``layers``, the final one from ``hidden``."""
    have = tuple(rec.get("feature_layers") or ())
    L = len(rec["hidden"])
    stored = None
    if rec.get("layers") is not None:
        from .data import expand_layers

        stored = expand_layers(rec["layers"], rec["spans"], L)  # [L, n, H]
    cols = []
    for i in feature_layers:
        if i == num_target_layers:
            cols.append(rec["hidden"].float())
        elif i in have and stored is not None:
            cols.append(stored[:, have.index(i)].float())
        else:
            from .data import DataError

            need = ",".join(str(j) for j in intermediate_layers(feature_layers, num_target_layers))
            raise DataError(f"the drafter reads target layer {i}, which this dataset did not record (it has "
                            f"{list(have) or 'only the final layer'}); regenerate it with "
                            f"`vllm-hivis generate-data --feature-layers {need}`")
    return torch.cat(cols, dim=-1)


def make_example(rec: dict, kind: str, num_q: int = 2, feature_layers: list[int] | None = None,
                 num_target_layers: int | None = None) -> dict:
    """feature_layers: a multi-layer drafter's target layers (its features are then [N, n*H]: the
    raw layers its combine_features turns into f)."""
    ids = torch.as_tensor(rec["input_ids"]).long()  # [L]
    hid = rec["hidden"].float()  # [L, H]
    feat = layer_features(rec, feature_layers, num_target_layers) if feature_layers else hid  # [L, n*H]
    L, plen = len(ids), int(rec["prompt_len"])
    spans = rec["spans"]
    if kind not in KINDS:
        raise ValueError(f"unknown drafter kind {kind!r}; expected one of {KINDS}")
    rows = torch.arange(L - 1) if kind == "eagle" else torch.from_numpy(kept_rows(spans, L - 1))
    positions = torch.arange(len(rows)) if kind in ("hivis", "text") else rows.clone()
    tgt_pos = rows + 2
    has_tgt = tgt_pos < L
    ex = {
        "input_ids": ids[rows + 1],
        "positions": positions,
        "features": feat[rows] if kind != "text" else torch.zeros(len(rows), hid.shape[1]),
        "target_ids": torch.where(has_tgt, ids[tgt_pos.clamp(max=L - 1)], IGNORE),
        "target_feats": hid[(rows + 1).clamp(max=L - 1)],
        "loss_mask": has_tgt & (tgt_pos >= plen),
        "anchor_ok": rows >= plen - 1,
        "target_rows": rows,
    }
    if kind == "vispec":
        ex = _with_adaptor_rows(ex, rec, num_q)
    return ex


def _with_adaptor_rows(ex: dict, rec: dict, num_q: int) -> dict:
    """Insert num_q - 1 adaptor rows per image at the last positions of its span (ViSpec)."""
    spans = rec["spans"]
    if len(spans) > 1:
        from .data import DataError

        raise DataError(f"record {rec.get('id', '?')!r} has {len(spans)} images, but the ViSpec-style baseline "
                        "handles one image per prompt; train kind 'vispec' on single-image data (or use kind "
                        "'hivis', which takes any number)")
    n = len(ex["input_ids"])
    ex["is_adaptor"] = torch.zeros(n, dtype=torch.bool)
    ex["after_image"] = torch.zeros(n, dtype=torch.bool)
    ex["image_embeds"] = rec["image_embeds"].float()
    if len(spans) == 0 or num_q < 2:
        return ex
    if len(ex["image_embeds"]) == 0:
        raise ValueError("the ViSpec-style drafter needs the target's projected image features, and this dataset "
                         "has none (its target's transformers model does not return them, e.g. Qwen2.5-VL); "
                         "train a hivis, text or eagle drafter on it")
    off, length = (int(v) for v in spans[0])
    k = num_q - 1
    slots = torch.arange(off + length - k, off + length)  # target positions of the adaptor rows
    at = int((ex["target_rows"] < slots[0]).sum())  # insert before the first later row
    H = ex["features"].shape[1]
    add = {"input_ids": torch.full((k,), IGNORE), "positions": slots,
           "features": rec["hidden"][slots - 1].float(), "target_ids": torch.full((k,), IGNORE),
           "target_feats": torch.zeros(k, H), "loss_mask": torch.zeros(k, dtype=torch.bool),
           "anchor_ok": torch.zeros(k, dtype=torch.bool), "target_rows": slots - 1,
           "is_adaptor": torch.ones(k, dtype=torch.bool), "after_image": torch.zeros(k, dtype=torch.bool)}
    out = {key: torch.cat([ex[key][:at], add[key], ex[key][at:]]) for key in add}
    out["after_image"] = out["target_rows"] >= off + length - 1
    out["after_image"][at:at + k] = False
    out["image_embeds"] = ex["image_embeds"]
    return out


def collate(examples: list[dict]) -> dict:
    """Right-pad a list of examples to [B, N_max] (padding rows are never loss or anchor rows)."""
    B, N = len(examples), max(len(e["input_ids"]) for e in examples)
    out = {}
    for key, v in examples[0].items():
        if key == "image_embeds":
            M = max(len(e[key]) for e in examples)
            buf = torch.zeros(B, M, v.shape[-1])
            for i, e in enumerate(examples):
                buf[i, : len(e[key])] = e[key]
            out[key] = buf
            continue
        fill = IGNORE if key == "target_ids" else 0
        buf = torch.full((B, N, *v.shape[1:]), fill, dtype=v.dtype)
        for i, e in enumerate(examples):
            buf[i, : len(e[key])] = e[key]
        out[key] = buf
    out["valid"] = torch.zeros(B, N, dtype=torch.bool)
    for i, e in enumerate(examples):
        out["valid"][i, : len(e["input_ids"])] = True
    return out
