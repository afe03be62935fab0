"""The drafter attention's CPU path: vLLM's own CPU attention kernel over a drafter-space copy.

serving/draft_attention.py keeps every drafter KV row at the target slot of its row, so a read
of drafter positions 0..L-1 is a gather through the position map. On the GPU the Triton kernel
does that gather inside the attention. On the CPU the drafter keeps a private paged copy of each
request's keys in drafter space (`StepKV`: request b's position c in the copy's block
b * blocks_per_request + c // COPY_BLOCK), so that every pass is vLLM's fused CPU attention
kernel (``cpu_attention_with_kv_cache``, the one the target's layers and vLLM's EAGLE drafter run)
over contiguous positions, plus one ``cpu_attn_reshape_and_cache`` for the pass's rows: a handful
of ops per pass instead of a gather and a padded SDPA. The copy is gathered from the cache at a
step's first pass (`StepKV.build`), or carried over from the last step when the batch holds the
same requests in the same rows on the same blocks (`StepKV.carry`: steady decoding), its keys
below the new rows still equal to the cache's. The kernel's torch reference is
kernels/tree_attention.py's ``tree_attention_ref`` with the position map (the tests hold the two
to each other over whole steps).

Which writes reach the paged cache: the first pass's rows (the verified rows, or a prefill chunk)
do, at their target slots, as on the GPU. The draft passes' rows (one per request, positions past
the verified rows) go to the copy only: no later step reads them from the cache, since the next
step's first pass rewrites every row from its window start on (the draft rows lie at or past it:
they follow the last accepted row), and vLLM never shares (prefix-caches) a block before its rows
are computed, i.e. rewritten by a first pass.

Limits: rows whose target position is past their request's writable limit (a dummy row's
lookahead, draft steps of a prefill chunk that ends inside an image) are never written to the
cache; their drafts are discarded, so what they attend to does not matter, as long as it is
finite: the copy holds zeros or written rows only. A row within its limit only sees keys at or
before it, all within the limit too (c -> p is increasing).

Index arithmetic runs in numpy on zero-copy views of the metadata's host tensors (the CPU build's
metadata tensors live on the host).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from ..method.plan import target_positions

COPY_BLOCK = 32  # positions per block of the copy (vLLM's CPU kernel wants a multiple of 32)
STEP_SLACK = 16  # key positions a copy holds past the first pass's longest sequence (one per draft pass)
ROUND = 64  # the copy's width per request is rounded up to a multiple of this (a multiple of COPY_BLOCK)


@functools.cache
def _isa(dtype: torch.dtype, head_size: int) -> str:
    """The CPU kernel's instruction set for this layer, as vLLM's CPU backend picks it."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, COPY_BLOCK, head_size, "auto")


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
    ranges: np.ndarray  # [B, S, 2] int32 the dropped ranges `p` was computed from (a copy)
    kv: torch.Tensor  # [B * W / COPY_BLOCK, H, 2 * COPY_BLOCK, D] the copy, in vLLM's CPU cache layout
    k: torch.Tensor | None = None  # [blocks, H, COPY_BLOCK, D] its K half (the kernel's packed layout)
    v: torch.Tensor | None = None  # [blocks, H, COPY_BLOCK, D] its V half
    block_table: torch.Tensor | None = None  # [B, W / COPY_BLOCK] int32: request b's blocks, in order
    base: np.ndarray | None = None  # [B] int64 the copy's slot of request b's position 0
    ranges_version: int = -1  # DropRanges.ranges_version `ranges` were read under (-1: compare them)

    def __post_init__(self):
        B, W = self.p.shape
        self.k, self.v = self.kv[:, :, :COPY_BLOCK], self.kv[:, :, COPY_BLOCK:]
        self.block_table = torch.arange(B * W // COPY_BLOCK, dtype=torch.int32).view(B, W // COPY_BLOCK)
        self.base = np.arange(B, dtype=np.int64) * W

    @property
    def width(self) -> int:
        return self.p.shape[1]

    @staticmethod
    def width_for(L: int) -> int:
        return -(-(max(1, L) + STEP_SLACK) // ROUND) * ROUND

    @staticmethod
    def _positions(md, W: int) -> np.ndarray:
        """[B, W] int64 target position of drafter key positions 0..W-1 of each request (method/
        plan.py target_positions; built when a copy is built or grown, not every step)."""
        c = torch.arange(W).expand(md.seq_lens.shape[0], W)
        return target_positions(c, md.ranges[:, None, : md.used_ranges]).numpy()  # ranges [B, 1, S, 2]

    @staticmethod
    def _writable(p: np.ndarray, md) -> np.ndarray:
        """[B] int64 n_valid: how many leading key positions lie within each request's limit."""
        return (p <= md.limit.numpy()[:, None]).sum(axis=1)

    @staticmethod
    def _empty(B: int, W: int, kv_cache: torch.Tensor) -> torch.Tensor:
        H, D = kv_cache.shape[1], kv_cache.shape[3] // 2
        return kv_cache.new_zeros(B * W // COPY_BLOCK, H, 2 * COPY_BLOCK, D)

    @classmethod
    def build(cls, key: tuple, md, kv_cache: torch.Tensor, q_lens: np.ndarray, req_ids: tuple | None) -> StepKV:
        """The copy at a step's first pass, before that pass writes its rows: key positions below
        each request's old length (seq_len - q_len) are gathered from the cache, the rest zero.
        md: HiViSDraftAttentionMetadata (host tensors); kv_cache: [num_blocks, H, block_size, 2D];
        q_lens: [B] rows of each request in this pass."""
        seq = md.seq_lens.numpy().astype(np.int64)
        W, bs = cls.width_for(int(seq.max())), kv_cache.shape[2]
        p = cls._positions(md, W)
        n_valid = cls._writable(p, md)
        n_held = np.minimum(seq - q_lens, n_valid)  # [B] keys already in the cache
        st = cls(key, req_ids, p, n_valid, n_held, md.block_table.numpy().copy(),
                 md.ranges[:, : md.used_ranges].numpy().copy(), cls._empty(len(seq), W, kv_cache),
                 ranges_version=md.ranges_version)
        b, c = np.nonzero(np.arange(W) < n_held[:, None])  # the held keys (the rest stays zero: never NaN)
        if len(b):
            t, pc = torch.from_numpy, p[b, c]
            held = kv_cache[t(st.table[b, pc // bs].astype(np.int64)), :, t(pc % bs)]  # [N, H, 2D]
            st._put(b, c, held)
        return st

    def carry(self, key: tuple, md, kv_cache: torch.Tensor, q_lens: np.ndarray,
              req_ids: tuple | None) -> StepKV | None:
        """This copy, to serve the step `key`, if it may: the same requests in the same rows with
        the same images (a client may reuse a request id), every key below this pass's rows still
        equal to the cache (the blocks that hold them unchanged: a preempted and resumed request
        gets new ones); None otherwise. Only this pass's rows are new then."""
        if req_ids is None or req_ids != self.req_ids:
            return None
        if md.ranges_version < 0 or md.ranges_version != self.ranges_version:
            if not np.array_equal(md.ranges[:, : md.used_ranges].numpy(), self.ranges):
                return None
            self.ranges_version = md.ranges_version
        seq = md.seq_lens.numpy().astype(np.int64)
        n_old = seq - q_lens
        if (n_old > self.n_cached).any():  # (n_cached <= width: so are these keys in the copy)
            return None
        table = md.block_table.numpy()
        if table.shape != self.table.shape or not np.array_equal(table, self.table):  # (steps mostly keep it)
            bs = kv_cache.shape[2]
            used = np.where(n_old > 0, self.p[np.arange(len(seq)), np.maximum(n_old - 1, 0)] // bs + 1, 0)  # [B]
            cols = min(table.shape[1], self.table.shape[1])
            if used.max() > cols or not ((table[:, :cols] == self.table[:, :cols])
                                         | (np.arange(cols) >= used[:, None])).all():
                return None
            self.table = table.copy()
        st = self if int(seq.max()) + STEP_SLACK <= self.width else self.grown(md, int(seq.max()))
        st.key = key
        st.n_valid = self._writable(st.p, md)
        st.n_cached = np.minimum(st.n_cached, n_old)
        return st

    def grown(self, md, L: int) -> StepKV:
        """This copy, wider (more draft passes than STEP_SLACK): the same keys, zero past them
        (whole blocks move: the kernel's packed layout stays inside a block)."""
        B, W = self.p.shape[0], self.width_for(L)
        kv = self.kv.new_zeros(B * W // COPY_BLOCK, *self.kv.shape[1:])
        kv.view(B, W // COPY_BLOCK, *kv.shape[1:])[:, : self.width // COPY_BLOCK] = \
            self.kv.view(B, self.width // COPY_BLOCK, *kv.shape[1:])
        p = self._positions(md, W)
        return StepKV(self.key, self.req_ids, p, self._writable(p, md), self.n_cached, self.table, self.ranges, kv,
                      ranges_version=self.ranges_version)

    def _put(self, req: np.ndarray, pos: np.ndarray, kv: torch.Tensor) -> None:
        """Rows (req, pos) of the copy <- kv [N, H, 2D] (through the kernel's own cache writer)."""
        from vllm import _custom_ops as ops

        D = kv.shape[-1] // 2
        slots = torch.from_numpy(req * self.width + pos)
        ops.cpu_attn_reshape_and_cache(kv[..., :D].contiguous(), kv[..., D:].contiguous(), self.k, self.v, slots,
                                       _isa(kv.dtype, D))

    def write(self, kv_cache: torch.Tensor, req: np.ndarray, pos: np.ndarray, k: torch.Tensor, v: torch.Tensor,
              to_cache: bool) -> None:
        """Rows (req, pos) get k, v [N, H, D] in the copy and, if `to_cache`, at their target slots
        in kv_cache (those within their request's limit); otherwise the copy no longer equals the
        cache from the first of them on."""
        from vllm import _custom_ops as ops

        t = torch.from_numpy
        assert k.dtype == v.dtype == self.kv.dtype and k.shape == v.shape and k.shape[0] == len(req), \
            (k.dtype, self.kv.dtype, tuple(k.shape), len(req))
        assert k.shape[1:] == self.k.shape[1:2] + self.k.shape[3:] and pos.max(initial=0) < self.width, \
            (tuple(k.shape), tuple(self.k.shape), self.width)
        ops.cpu_attn_reshape_and_cache(k, v, self.k, self.v, t(req * self.width + pos), _isa(k.dtype, k.shape[-1]))
        if not to_cache:
            np.minimum.at(self.n_cached, req, pos)
            return
        ok = pos < self.n_valid[req]
        new_kv = torch.cat([k, v], dim=-1).to(kv_cache.dtype)
        if not ok.all():
            req, pos, new_kv = req[ok], pos[ok], new_kv[t(ok)]
        p, bs = self.p[req, pos], kv_cache.shape[2]
        kv_cache[t(self.table[req, p // bs].astype(np.int64)), :, t(p % bs)] = new_kv
        np.maximum.at(self.n_cached, req, pos + 1)

    def draft_pass(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, md,
                   num_kv_heads: int, scale: float) -> None:
        """A draft pass: one row per request, at drafter position seq_len - 1, written to the copy
        only, then attention (`write` and `attend` in the fewest host ops: this runs k - 1 times a
        step). q, out: [B, Hq, D]; k, v: [B, H, D]."""
        from vllm import _custom_ops as ops

        pos = md.seq_lens.numpy() - 1  # [B] (int32; the metadata's own host tensor)
        assert pos.max() < self.width, f"a draft pass past the copy's width ({int(pos.max())} >= {self.width})"
        assert k.dtype == self.kv.dtype and k.shape == v.shape and k.shape[0] == len(pos), (k.dtype, tuple(k.shape))
        ops.cpu_attn_reshape_and_cache(k, v, self.k, self.v, torch.from_numpy(self.base + pos),
                                       _isa(k.dtype, k.shape[-1]))
        np.minimum(self.n_cached, pos, out=self.n_cached)
        self.attend(q, out, md, num_kv_heads, scale)

    def attend(self, q: torch.Tensor, out: torch.Tensor, md, num_kv_heads: int, scale: float) -> None:
        """Bottom-right causal attention of the pass's rows over the copy, into `out`: row j of
        request b (q_b rows, drafter sequence length seq_b) at position seq_b - q_b + j sees keys
        0..itself. q, out: [T, Hq, D]; md: query_start_loc [B + 1], seq_lens [B] (int32)."""
        from vllm import _custom_ops as ops
        from vllm import envs

        # the C++ kernel trusts its arguments (a wrong dtype or shape corrupts memory): check them
        assert q.dtype == out.dtype == self.kv.dtype and q.shape == out.shape and q.shape[-1] == self.kv.shape[-1], \
            (q.dtype, out.dtype, self.kv.dtype, tuple(q.shape), tuple(out.shape), tuple(self.kv.shape))
        assert q.shape[0] == md.num_actual_tokens and md.seq_lens.dtype == md.query_start_loc.dtype == torch.int32
        isa = _isa(q.dtype, q.shape[-1])
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=self.p.shape[0], num_heads=q.shape[1], num_kv_heads=num_kv_heads, head_dim=q.shape[2],
            seq_lens=md.seq_lens, dtype=q.dtype, query_start_loc=md.query_start_loc, causal=True,
            sliding_window_size=-1, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=self.k, value_cache=self.v, output=out, query_start_loc=md.query_start_loc,
            seq_lens=md.seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=self.block_table, softcap=0.0, scheduler_metadata=sched, s_aux=None)


def pass_rows(md) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query_start_loc [B + 1], seq_lens [B], request [T], drafter position [T]) of a pass's rows,
    int64 host arrays (bottom-right causal: row j of request b at seq[b] - q_b + j)."""
    qsl = md.query_start_loc.numpy().astype(np.int64)
    seq = md.seq_lens.numpy().astype(np.int64)
    n_q = np.diff(qsl)
    T = int(qsl[-1])
    req = np.repeat(np.arange(len(seq)), n_q)
    return qsl, seq, req, (seq - n_q)[req] + np.arange(T) - qsl[req]
