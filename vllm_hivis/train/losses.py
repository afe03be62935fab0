"""The drafter training recipe: every HiViS component is a switch with the loss it adds.

Notation: row i of a collated batch, f_i its input feature, x_i its input token, y_i its target
token (x_{p+2}), h_i the target feature (h_{p+1}), q the drafter's next-token distribution,
p_i = softmax(LMHead(h_i)) the target's. Token loss: soft cross-entropy -Σ p log q (EAGLE).

- baseline (single-step EAGLE distillation, unroll=1):
      L0 = CE(p_i, q_i) + w_feat · SmoothL1(f̂_i, h_i)          over loss rows
- multi-step self-feedback (v1, unroll=K): drafting step k >= 1 of a chain anchored at row i-k
  reads the drafter's own step-(k-1) output f̂ as its feature and attends to the verified rows
  <= i-k plus its own chain (exactly what the drafter sees in vLLM):  L = Σ_k w_k · CE_k
- dynamic data selection (v1): step k is trained only on chains whose drafts at steps < k were
  all correct (the rows where acceptance is still being decided; the rest never get verified)
- sequential embedding supervision (v1): also regress the propagated feature at steps k >= 1:
      + w_feat · SmoothL1(f̂^k_i, h_i)
- step-dependent bias-correction residuals (v2): learned b_k added to the fed-back feature at step
  k (parameters of the drafter; served by vLLM too)
- time-step-aware aligned weighting (v2): w_k = ρ_k, the measured fraction of chains that reach
  step k (detached), instead of the fixed w_k = decay^k: each step counts as often as it is used

The mask of step k: query row i attends to step-0 rows j <= i-k and to the step-m row i-k+m for
m = 1..k (its own chain), keys of all steps held in one cache.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Recipe:
    kind: str = "hivis"  # hivis | text | eagle | vispec (examples.py, drafters.py)
    unroll: int = 1  # K drafting steps simulated per anchor (1 = single-step baseline)
    step_decay: float = 0.8  # fixed step weights w_k = decay^k (when not time_aware)
    dynamic_selection: bool = False
    seq_embed_supervision: bool = False
    step_bias: bool = False
    time_aware: bool = False
    w_feat: float = 0.5
    num_q: int = 2  # vispec only
    feature_layers: list[int] | None = None  # hivis only: multi-layer target features (checkpoint.py)

    @classmethod
    def named(cls, name: str, kind: str = "hivis", unroll: int = 4) -> Recipe:
        """The ablation ladder: each name adds one component to the previous one."""
        ladder = ["single-step", "self-feedback", "data-selection", "seq-embed", "step-bias", "time-aware"]
        if name not in ladder:
            raise ValueError(f"unknown recipe {name!r}; expected one of {ladder}")
        n = ladder.index(name)
        return cls(kind=kind, unroll=1 if n == 0 else unroll, dynamic_selection=n >= 2,
                   seq_embed_supervision=n >= 3, step_bias=n >= 4, time_aware=n >= 5).checked()

    def checked(self) -> Recipe:
        """The recipe, if every drafter of its kind can be trained *and exported* with it (raises
        ValueError before any work starts otherwise)."""
        kinds = ("hivis", "text", "eagle", "vispec")
        if self.kind not in kinds:
            raise ValueError(f"unknown drafter kind {self.kind!r}; expected one of {kinds}")
        if self.unroll < 1:
            raise ValueError(f"unroll must be >= 1 (drafting steps simulated per anchor), got {self.unroll}")
        if self.kind == "eagle" and self.step_bias:
            raise ValueError("kind 'eagle' is exported in vLLM's own EAGLE head format, which has no step-bias "
                             "residuals: use a recipe without them (--recipe seq-embed or lower)")
        if self.feature_layers is not None:
            layers = list(self.feature_layers)
            if self.kind != "hivis":
                raise ValueError(f"feature layers are a hivis drafter option; kind {self.kind!r} reads "
                                 f"{'no target features' if self.kind == 'text' else 'the last layer only'}")
            if not layers or layers != sorted(set(layers)) or min(layers) < 1:
                raise ValueError(f"feature layers must be distinct positive layer indices in increasing order, "
                                 f"got {layers}")
        if self.kind == "vispec" and self.num_q < 1:
            raise ValueError(f"num_q must be >= 1 for kind 'vispec', got {self.num_q}")
        return self


def step_mask(valid: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 1, N, (k+1)N] bool mask of drafting step k over the keys of steps 0..k (see module doc)."""
    B, N = valid.shape
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    blocks = [(j <= i - k)]  # step 0: verified rows up to the anchor
    blocks += [(j == i - k + m) for m in range(1, k + 1)]  # the chain's own earlier steps
    m = torch.cat(blocks, dim=1)[None, None].expand(B, 1, N, (k + 1) * N)
    return m & valid.repeat(1, k + 1)[:, None, None, :]


class DraftLoss(torch.nn.Module):
    """The drafter plus the target's frozen embedding and LM head; forward(batch) = (loss, stats).

    One forward per optimizer step, so data-parallel wrappers (DDP) see a single graph."""

    def __init__(self, model, embed, lm_head, recipe: Recipe):
        super().__init__()
        self.model, self.embed, self.lm_head, self.recipe = model, embed, lm_head, recipe

    def forward(self, batch: dict):
        return unrolled_loss(self.model, self.embed, self.lm_head, batch, self.recipe)


def unrolled_loss(model, embed, lm_head, batch: dict, recipe: Recipe) -> tuple[torch.Tensor, dict]:
    """Loss of one collated batch; `model` is any drafter of the interface in drafters.py."""
    from transformers import DynamicCache

    drafter = model.core
    valid, pos = batch["valid"], batch["positions"]
    emb, fuse = model.inputs(batch, embed)
    feats = drafter.combine_features(batch["features"])  # [B, N, H] (multi-layer drafters: from [B, N, n*H])
    with torch.no_grad():
        target_logp = F.log_softmax(lm_head(batch["target_feats"]).float(), -1)
    tgt_ids, loss_rows, anchors = batch["target_ids"], batch["loss_mask"], batch["anchor_ok"]

    cache = DynamicCache()
    causal = step_mask(valid, 0)
    out = drafter(emb, fuse(feats), pos, steps=0, mask=causal, cache=cache)
    total, stats = 0.0, {}
    reach = anchors & loss_rows  # rows where a drafting chain is at step 0
    n0 = reach.sum().clamp(min=1)
    for k in range(recipe.unroll):
        if k > 0:
            fed = torch.zeros_like(out)
            fed[:, 1:] = out[:, :-1]  # step k row i reads step k-1 output of row i-1 (same chain)
            out = drafter(emb, fuse(fed), pos, steps=k, mask=step_mask(valid, k), cache=cache)
            shifted = torch.zeros_like(reach)
            shifted[:, 1:] = reach[:, :-1]
            reach = shifted & loss_rows  # the chain continues one row further
        logits = lm_head(out).float()
        logq = F.log_softmax(logits, -1)
        rows = reach.float()
        n = rows.sum().clamp(min=1)
        ce = (-(target_logp.exp() * logq).sum(-1) * rows).sum() / n
        step_loss = ce
        if k == 0 or recipe.seq_embed_supervision:
            feat = (F.smooth_l1_loss(out, batch["target_feats"], reduction="none").mean(-1) * rows).sum() / n
            step_loss = step_loss + recipe.w_feat * feat
        with torch.no_grad():
            correct = (logits.argmax(-1) == tgt_ids) & reach
            rho = rows.sum() / n0
        w = rho if recipe.time_aware else recipe.step_decay ** k
        total = total + w * step_loss
        stats[f"ce{k}"] = float(ce.detach())
        stats[f"acc{k}"] = float(correct.sum() / n)
        stats[f"reach{k}"] = float(rho)
        if recipe.dynamic_selection:
            reach = correct  # later steps train only on chains still fully accepted
    return total, stats
