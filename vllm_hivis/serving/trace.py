"""Optional per-step trace of what the drafter saw (for parity tests and acceptance debugging).

Off unless ``VLLM_HIVIS_TRACE_DIR`` is set. Then every proposal of the first drafter pass writes
``<dir>/<pid>-<n>.npz`` with, per kept row: request id index, target position, drafter position,
input token id, input feature, output feature and whether it is a dummy row (a chunk wholly
inside an image); and the draft tokens of every request.
Files are written by the worker process that runs the drafter.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

TRACE_DIR_ENV = "VLLM_HIVIS_TRACE_DIR"


def _numpy(x: torch.Tensor) -> np.ndarray:
    """A copy: on the CPU .numpy() would alias the proposer's persistent buffers, which the later
    draft steps overwrite."""
    return x.detach().cpu().numpy().copy()


class ProposalTracer:
    def __init__(self):
        d = os.environ.get(TRACE_DIR_ENV)
        self.dir = Path(d) if d else None
        self.n = 0
        self.rec: dict[str, np.ndarray] | None = None

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def begin(self, req_ids: list[str], req_of_row, target_pos, drafter_pos, input_ids, features, is_dummy) -> None:
        # req_of_row/target_pos/drafter_pos/input_ids/is_dummy: [M]; features: [M, H]
        t = lambda x: _numpy(x.float()) if isinstance(x, torch.Tensor) else np.array(x)  # noqa: E731
        self.rec = {"req_ids": np.array(req_ids), "req_of_row": t(req_of_row), "target_pos": t(target_pos),
                    "drafter_pos": t(drafter_pos), "input_ids": t(input_ids), "features": t(features),
                    "is_dummy": t(is_dummy)}

    def output(self, out_features: torch.Tensor) -> None:
        if self.rec is not None and "out_features" not in self.rec:
            self.rec["out_features"] = _numpy(out_features[: len(self.rec["input_ids"])].float())

    def end(self, draft_token_ids: torch.Tensor, sample_rows: torch.Tensor | None = None) -> None:
        if self.rec is None:
            return
        self.rec["draft_token_ids"] = _numpy(draft_token_ids)
        if sample_rows is not None:
            self.rec["sample_rows"] = sample_rows.detach().cpu().numpy()
        self.dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.dir / f"{os.getpid()}-{self.n:06d}.npz", **self.rec)
        self.n += 1
        self.rec = None


def load_traces(trace_dir: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """All trace records of a directory, in write order per process."""
    out = []
    for f in sorted(Path(trace_dir).glob("*.npz")):
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files})
    return out
