"""Acceptance figures from vLLM's spec-decode counters, in both conventions.

- ``accepted_per_draft`` (τ, ViSpec/HiViS convention): accepted draft tokens per drafting step,
  bonus token excluded.
- ``tokens_per_step`` (EAGLE/vLLM "mean acceptance length"): τ + 1, the bonus token included.
- ``per_position``: fraction of drafting steps whose i-th draft token was accepted.
Inputs are vLLM's counters (``vllm:spec_decode_num_drafts`` etc.) from ``/metrics`` text or from
``LLM.get_metrics()``, plus hivis's drafter/target prefill counters.
"""

from __future__ import annotations

import dataclasses
import re

SPEC = "vllm:spec_decode_"
HIVIS = "vllm:hivis_"


@dataclasses.dataclass
class Acceptance:
    num_drafts: float
    num_draft_tokens: float
    num_accepted: float
    per_position_counts: list[float]
    drafter_prefill_tokens: float = 0.0
    target_prefill_tokens: float = 0.0

    @property
    def accepted_per_draft(self) -> float:
        return self.num_accepted / self.num_drafts if self.num_drafts else 0.0

    @property
    def tokens_per_step(self) -> float:
        return 1.0 + self.accepted_per_draft

    @property
    def per_position(self) -> list[float]:
        return [c / self.num_drafts if self.num_drafts else 0.0 for c in self.per_position_counts]

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def prefill_ratio(self) -> float | None:
        return self.drafter_prefill_tokens / self.target_prefill_tokens if self.target_prefill_tokens else None

    def minus(self, before: Acceptance) -> Acceptance:
        """Counter deltas (metrics are cumulative; measure a run as after.minus(before))."""
        return self._combine(before, -1.0)

    def plus(self, other: Acceptance) -> Acceptance:
        """The counters of two runs together."""
        return self._combine(other, 1.0)

    def _combine(self, o: Acceptance, sign: float) -> Acceptance:
        n = max(len(self.per_position_counts), len(o.per_position_counts))
        pad = lambda v: list(v) + [0.0] * (n - len(v))  # noqa: E731
        return Acceptance(
            self.num_drafts + sign * o.num_drafts, self.num_draft_tokens + sign * o.num_draft_tokens,
            self.num_accepted + sign * o.num_accepted,
            [a + sign * b for a, b in zip(pad(self.per_position_counts), pad(o.per_position_counts))],
            self.drafter_prefill_tokens + sign * o.drafter_prefill_tokens,
            self.target_prefill_tokens + sign * o.target_prefill_tokens)

    def summary(self) -> dict:
        return {"drafts": self.num_drafts, "draft_tokens": self.num_draft_tokens, "accepted": self.num_accepted,
                "accepted_per_draft": round(self.accepted_per_draft, 4),
                "tokens_per_step": round(self.tokens_per_step, 4),
                "draft_acceptance_rate": round(self.draft_acceptance_rate, 4),
                "per_position": [round(x, 4) for x in self.per_position],
                "drafter_prefill_tokens": self.drafter_prefill_tokens,
                "target_prefill_tokens": self.target_prefill_tokens,
                "prefill_ratio": None if self.prefill_ratio is None else round(self.prefill_ratio, 4)}


_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')


def from_prometheus_text(text: str) -> Acceptance:
    """Sum the counters over all label sets (engines, models) of a /metrics page."""
    vals: dict[str, float] = {}
    pos: dict[int, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m or not m["name"].endswith("_total"):
            continue
        name, v = m["name"].removesuffix("_total"), float(m["value"])
        if name == SPEC + "num_accepted_tokens_per_pos":
            p = int(re.search(r'position="(\d+)"', m["labels"] or "").group(1))
            pos[p] = pos.get(p, 0.0) + v
        else:
            vals[name] = vals.get(name, 0.0) + v
    return _build(vals, pos)


def from_llm_metrics(metrics) -> Acceptance:
    """From ``LLM(..., disable_log_stats=False).get_metrics()`` (vllm.v1.metrics.reader objects)."""
    vals: dict[str, float] = {}
    pos: dict[int, float] = {}
    for m in metrics:
        if m.name == SPEC + "num_accepted_tokens_per_pos":
            for i, v in enumerate(m.values):
                pos[i] = pos.get(i, 0.0) + v
        elif hasattr(m, "value"):
            vals[m.name] = vals.get(m.name, 0.0) + float(m.value)
    return _build(vals, pos)


def _build(vals: dict[str, float], pos: dict[int, float]) -> Acceptance:
    g = lambda k: vals.get(k, 0.0)  # noqa: E731
    return Acceptance(g(SPEC + "num_drafts"), g(SPEC + "num_draft_tokens"), g(SPEC + "num_accepted_tokens"),
                      [pos[i] for i in sorted(pos)], g(HIVIS + "drafter_prefill_tokens"),
                      g(HIVIS + "target_prefill_tokens"))
