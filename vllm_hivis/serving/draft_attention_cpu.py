"""The drafter attention's CPU path: a drafter-space copy of each request's keys.

serving/draft_attention.py keeps every drafter KV row at the target slot of its row, so a read
of drafter positions 0..L-1 is a gather through the position map. On the GPU the Triton kernel
does that gather inside the attention; on the CPU a gather per pass is a dozen small torch ops,
and a step makes k passes. So the CPU path keeps a dense [B, W, H, 2D] copy in drafter space
(`StepKV`): every pass appends its rows there and attends over the copy with one SDPA call. The
copy is gathered from the cache at a step's first pass (`StepKV.build`), or carried over from
the last step when the batch holds the same requests in the same rows on the same blocks
(`StepKV.carry`: steady decoding), its keys below the new rows still equal to the cache's.

Which writes reach the paged cache: the first pass's rows (the verified rows, or a prefill chunk)
do, at their target slots, as on the GPU. The draft passes' rows (one per request, positions past
the verified rows) go to the step's copy only: no later step reads them from the cache, since the
next step's first pass rewrites every row from its window start on (the draft rows lie at or past
it: they follow the last accepted row), and vLLM never shares (prefix-caches) a block before its
rows are computed, i.e. rewritten by a first pass. Their attention output is the same.

Limits: keys whose target position is past a request's writable limit (a dummy row's lookahead,
draft steps of a prefill chunk that ends inside an image) are never written and never visible;
since c -> p is increasing, the visible keys of request b are a prefix 0..n_valid[b] - 1.

Index arithmetic runs in numpy on zero-copy views of the metadata's host tensors (a few numpy ops
per pass instead of torch dispatches); the CPU build's metadata tensors live on the host.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

STEP_SLACK = 16  # key positions a step's copy holds past the first pass's longest sequence (one per draft pass)
ROUND = 64  # the copy's width is rounded up to a multiple of this (fewer distinct shapes)


@dataclasses.dataclass
class StepKV:
    """The drafter-space keys of every request of the batch (CPU tensors) for one step, carried on
    to the next step when it holds the same requests in the same rows on the same blocks."""

    key: tuple  # (DropRanges.version, batch size, block table address and shape): the step it serves
    req_ids: tuple | None  # the batch's requests, row by row (None: never carried)
    p: np.ndarray  # [B, W] int64 target position of drafter key position c (method/plan.py target_positions)
    n_valid: np.ndarray  # [B] int64 key positions 0..n_valid-1 are writable (target position <= limit)
    n_cached: np.ndarray  # [B] int64 keys 0..n_cached-1 of the copy equal the paged cache's
    table: np.ndarray  # [B, nb] int32 the block table the copy was checked against (a copy)
    kv: torch.Tensor  # [B, W, H, 2D] the keys (K | V halves), in the cache's dtype; finite everywhere
    k: torch.Tensor | None = None  # [B, H, W, D] view of kv's K half (set in __post_init__)
    v: torch.Tensor | None = None  # [B, H, W, D] view of kv's V half
    rows: np.ndarray | None = None  # [B] int64 0..B-1

    def __post_init__(self):
        D = self.kv.shape[-1] // 2
        self.k, self.v = self.kv[..., :D].transpose(1, 2), self.kv[..., D:].transpose(1, 2)
        self.rows = np.arange(self.kv.shape[0])

    @property
    def width(self) -> int:
        return self.kv.shape[1]

    @staticmethod
    def width_for(L: int) -> int:
        return -(-(max(1, L) + STEP_SLACK) // ROUND) * ROUND

    @staticmethod
    def _positions(md, W: int) -> np.ndarray:
        """[B, W] int64 target position of drafter key positions 0..W-1 of each request."""
        ranges = md.ranges[:, : md.used_ranges].numpy().astype(np.int64)  # [B, S, 2]
        p = np.broadcast_to(np.arange(W, dtype=np.int64), (md.seq_lens.shape[0], W))
        for s in range(ranges.shape[1]):  # c -> p
            lo, hi = ranges[:, s, :1], ranges[:, s, 1:]
            p = np.where(p >= lo, p + (hi - lo), p)
        return p

    @classmethod
    def build(cls, key: tuple, md, kv_cache: torch.Tensor, q_lens: np.ndarray, req_ids: tuple | None) -> StepKV:
        """The copy at a step's first pass, before that pass writes its rows: key positions below
        each request's old length (seq_len - q_len) are gathered from the cache, the rest zero.
        md: HiViSDraftAttentionMetadata (host tensors); kv_cache: [num_blocks, H, block_size, 2D];
        q_lens: [B] rows of each request in this pass."""
        seq = md.seq_lens.numpy().astype(np.int64)
        W, bs = cls.width_for(int(seq.max())), kv_cache.shape[2]
        p = cls._positions(md, W)
        n_valid = (p <= md.limit.numpy()[:, None]).sum(axis=1)
        n_held = np.minimum(seq - q_lens, n_valid)  # [B] keys already in the cache
        table = md.block_table.numpy()
        t = torch.from_numpy
        if len(seq) == 1:  # the held keys only; the rest stays zero
            kv = kv_cache.new_zeros(1, W, kv_cache.shape[1], kv_cache.shape[3])
            pb = p[0, : n_held[0]]
            kv[0, : n_held[0]] = kv_cache[t(table[0, pb // bs].astype(np.int64)), :, t(pb % bs)]
        else:
            blk = np.take_along_axis(table, np.minimum(p // bs, table.shape[1] - 1), axis=1).astype(np.int64)
            kv = kv_cache[t(blk), :, t(p % bs)]  # [B, W, H, 2D]
            # unheld keys may hold anything, NaN included: zero them (a masked score leaves 0 * NaN)
            kv.masked_fill_(t(np.arange(W) >= n_held[:, None])[..., None, None], 0)
        return cls(key, req_ids, p, n_valid, n_held, table.copy(), kv)

    def carry(self, key: tuple, md, kv_cache: torch.Tensor, q_lens: np.ndarray,
              req_ids: tuple | None) -> StepKV | None:
        """This copy, to serve the step `key`, if it may: the same requests in the same rows, every
        key below this pass's rows still equal to the cache (the blocks that hold them unchanged:
        a preempted and resumed request gets new ones); None otherwise. Only this pass's rows are
        new then."""
        if req_ids is None or req_ids != self.req_ids:
            return None
        seq = md.seq_lens.numpy().astype(np.int64)
        n_old = seq - q_lens
        if (n_old > self.n_cached).any() or (n_old > self.width).any():
            return None
        bs, table = kv_cache.shape[2], md.block_table.numpy()
        used = np.where(n_old > 0, self.p[self.rows, np.maximum(n_old - 1, 0)] // bs + 1, 0)  # [B] blocks read
        cols = min(table.shape[1], self.table.shape[1])
        if used.max() > cols or not ((table[:, :cols] == self.table[:, :cols])
                                     | (np.arange(cols) >= used[:, None])).all():
            return None
        st = self if int(seq.max()) + STEP_SLACK <= self.width else self.grown(md, int(seq.max()))
        st.key, st.table = key, table.copy()
        st.n_valid = (st.p <= md.limit.numpy()[:, None]).sum(axis=1)
        st.n_cached = np.minimum(st.n_cached, n_old)
        return st

    def grown(self, md, L: int) -> StepKV:
        """This step's copy, wider (more draft passes than STEP_SLACK): the same keys, zero past them."""
        W = self.width_for(L)
        kv = self.kv.new_zeros(self.kv.shape[0], W, *self.kv.shape[2:])
        kv[:, : self.width] = self.kv
        p = self._positions(md, W)
        n_valid = (p <= md.limit.numpy()[:, None]).sum(axis=1)
        return StepKV(self.key, self.req_ids, p, n_valid, self.n_cached, self.table, kv)

    def write(self, kv_cache: torch.Tensor, req: np.ndarray, pos: np.ndarray, new_kv: torch.Tensor,
              to_cache: bool) -> None:
        """Rows (req, pos) get new_kv [N, H, 2D] in the copy and, if `to_cache`, at their target
        slots in kv_cache (those within their request's limit); otherwise the copy no longer
        equals the cache from the first of them on."""
        t = torch.from_numpy
        self.kv[t(req), t(pos)] = new_kv
        if not to_cache:
            if req is self.rows:  # a draft pass: one row per request, in order
                np.minimum(self.n_cached, pos, out=self.n_cached)
            else:
                np.minimum.at(self.n_cached, req, pos)
            return
        ok = pos < self.n_valid[req]
        if not ok.all():
            req, pos, new_kv = req[ok], pos[ok], new_kv[t(ok)]
        p, bs = self.p[req, pos], kv_cache.shape[2]
        kv_cache[t(self.table[req, p // bs].astype(np.int64)), :, t(p % bs)] = new_kv
        np.maximum.at(self.n_cached, req, pos + 1)


def attend_decode(st: StepKV, q: torch.Tensor, seq: np.ndarray, scale: float) -> torch.Tensor:
    """A pass with one row per request, each at drafter position seq[b] - 1 (already written):
    attention over keys 0..min(seq[b], n_valid[b]) - 1 (at least key 0: a row past its limit
    still needs one, its drafts are discarded).
    q: [B, Hq, D]; seq: [B] int64 -> [B, Hq, D] in q's dtype."""
    L = int(seq.max())
    n_vis = np.maximum(np.minimum(seq, st.n_valid), 1)
    mask = None if (n_vis == L).all() else torch.from_numpy(np.arange(L) < n_vis[:, None])[:, None, None]
    k, v = st.k[:, :, :L], st.v[:, :, :L]
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    o = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])  # [B, Hq, 1, D]
    return o[:, :, 0]


def attend_rows(st: StepKV, q: torch.Tensor, qsl: np.ndarray, seq: np.ndarray, scale: float) -> torch.Tensor:
    """A pass with q_b rows per request (a prefill chunk, or the verified rows), bottom-right
    causal: row j of request b is at drafter position seq[b] - q_b + j and sees keys 0..itself
    that are within the request's limit. Requests padded to [B, Q] queries, one SDPA call.
    q: [T, Hq, D] (T = qsl[-1]); qsl: [B + 1]; seq: [B] -> [T, Hq, D] in q's dtype."""
    B, T, D = len(seq), q.shape[0], q.shape[2]
    n_q = np.diff(qsl)
    Q, L = max(1, int(n_q.max())), max(1, int(seq.max()))
    k, v = st.k[:, :, :L], st.v[:, :, :L]
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    j = np.arange(Q)
    pos = (seq - n_q)[:, None] + j  # [B, Q] drafter position of each padded query
    c = np.arange(L)
    visible = (c <= pos[..., None]) & (c < st.n_valid[:, None, None])  # [B, Q, L]
    visible[..., 0] |= ~visible.any(-1)  # padding queries (or rows past the limit): no all-masked row
    if B == 1 and Q == T:  # one request, no padding
        qp, rows = q[None], None
    else:
        rows = np.minimum(qsl[:-1, None] + j, T - 1)  # [B, Q] batch row of each padded query
        qp = q[torch.from_numpy(rows)]  # [B, Q, Hq, D]
    o = torch.nn.functional.scaled_dot_product_attention(
        qp.transpose(1, 2), k, v, attn_mask=torch.from_numpy(visible)[:, None], scale=scale,
        enable_gqa=k.shape[1] != q.shape[1]).transpose(1, 2)  # [B, Q, Hq, D]
    if rows is None:
        return o[0]
    real = j < n_q[:, None]
    out = q.new_empty(T, q.shape[1], D)
    out[torch.from_numpy(rows[real])] = o[torch.from_numpy(real)]
    return out


def pass_rows(md) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query_start_loc [B + 1], seq_lens [B], request [T], drafter position [T]) of a pass's rows,
    int64 host arrays (bottom-right causal: row j of request b at seq[b] - q_b + j)."""
    qsl = md.query_start_loc.numpy().astype(np.int64)
    seq = md.seq_lens.numpy().astype(np.int64)
    n_q = np.diff(qsl)
    T = int(qsl[-1])
    req = np.repeat(np.arange(len(seq)), n_q)
    return qsl, seq, req, (seq - n_q)[req] + np.arange(T) - qsl[req]
