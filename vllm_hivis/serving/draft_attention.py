"""The drafter's attention: its KV lives at the *target* slots of the rows it keeps.

Why (prefix caching): vLLM shares the KV blocks of identical prompt prefixes between requests. If
the drafter stored its compressed sequence at compressed positions (c <= p) inside the request's
blocks, a request's own text after a shared image would be written into the shared blocks (slots
[c(s), s)), where requests sharing the image overwrite each other's drafter context: one tenant's
private text would change another's acceptance (a timing side channel). Stored at the target slot
of its row, every drafter KV entry is a function of the prompt prefix up to that row and its next
token (as for vLLM's own EAGLE, whose one-token shift vLLM's prefix cache already accounts for), so
shared blocks hold identical drafter KV for every request that shares them. The image rows'
slots are simply never written. Memory: none extra (the drafter layer's cache spans every block,
image rows included, as for EAGLE).

So this backend, used by the drafter's one attention layer only (target layers keep the
platform's backend), works in drafter space (compressed positions, as RoPE and vLLM's EAGLE loop
see them) and translates each compressed position to its target position for every read and
write: c -> p = c + (rows dropped before p), from each request's dropped ranges (method/plan.py
``dropped_ranges``, target positions [lo, hi), sorted) that the proposer publishes every step
(`DropRanges`). Writes beyond the window's allocation (a dummy row's, or the draft steps of a
prefill chunk ending inside an image, whose drafts are discarded) are skipped.

Queries follow vLLM's convention (bottom-right causal): row j of request i, with q_i rows and
drafter sequence length L_i, is at compressed position L_i - q_i + j and attends to 0..itself.
Attention: Triton on GPU (kernels/tree_attention.py, causal, with the position map); on the CPU
vLLM's own CPU attention kernel over a drafter-space copy of the keys (serving/draft_attention_cpu.py);
the kernel tests hold both to the Triton kernel's torch reference.

KV cache: vLLM hands the layer a [num_blocks, num_kv_heads, block_size, 2 * head_dim] view in the
global layout; K is its [..., :head_dim] half, V the other, read as [num_blocks, block_size, heads,
head_dim] strided views (page-local, so vLLM's per-block zeroing / copies stay correct).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from .draft_attention_cpu import StepKV, pass_rows

NAME = "HIVIS_DRAFT_ATTN"
NO_LIMIT = 2**31 - 1


def register() -> None:
    """Give the backend an AttentionBackendEnum member (Attention.__init__ looks its name up)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if NAME not in AttentionBackendEnum.__members__:
        register_backend(NAME, f"{__name__}.HiViSDraftAttentionBackend")


class DropRanges:
    """The per-step side channel from the proposer to this backend: for batch row i (a request),
    its dropped target ranges and the last target position it may write. Persistent device
    buffers (CUDA graphs read them by address), sized for ``max_spans`` images per request; a batch
    with more grows them (logged; a captured V2 graph would then need a restart)."""

    current: DropRanges | None = None  # the worker process's instance (one drafter per worker)

    def __init__(self, max_reqs: int, max_spans: int, device: torch.device):
        self.device, self.used, self.req_ids = device, 1, None
        self.version = 0  # bumped by every publish (once per step): per-step caches key on it
        self.ranges_version = 0  # bumped when the ranges are rewritten (not by publish_limits)
        self._allocate(max_reqs, max(1, max_spans))
        self._limit_cpu = torch.full((max_reqs,), NO_LIMIT, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._limit_np = self._limit_cpu.numpy()  # (a view: its host memory)
        self.limit = (self._limit_cpu if device.type == "cpu"
                      else torch.full((max_reqs,), NO_LIMIT, dtype=torch.int32, device=device))  # [R]
        self._copied = None  # CUDA: an event after the last host-to-device copies of the pinned buffers
        DropRanges.current = self

    def _allocate(self, max_reqs: int, S: int) -> None:
        self._ranges_cpu = torch.zeros(max_reqs, S, 2, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        # [R, S, 2] lo, hi (on the CPU build the host buffer itself: nothing to copy)
        self.ranges = (self._ranges_cpu if self.device.type == "cpu"
                       else torch.zeros(max_reqs, S, 2, dtype=torch.int32, device=self.device))

    def publish(self, lo: np.ndarray, hi: np.ndarray, limit: np.ndarray, req_ids: tuple | None = None) -> None:
        # lo, hi: [B, S] int64 (method/plan.dropped_ranges); limit: [B] last writable target position;
        # req_ids: the batch's B requests, row by row, if known (the CPU path carries its copy by them)
        B, S = lo.shape
        R, cap, _ = self.ranges.shape
        assert B <= R, (B, R)
        if S > cap:
            logging.getLogger("vllm_hivis.draft_attention").warning(
                "hivis: a request holds %d images, more than the %d the drafter attention was sized for; "
                "growing its buffers", S, cap)
            self._allocate(R, S)
        if self._copied is not None:  # the last step's copies still read the pinned buffers (async
            self._copied.synchronize()  # scheduling lets the host run a step ahead): wait for them
        r = self._ranges_cpu.numpy()
        r[:B] = 0
        r[:B, :S, 0], r[:B, :S, 1] = lo, hi
        self._limit_np[:B] = np.minimum(limit, NO_LIMIT)
        if self.device.type != "cpu":
            self.ranges[:B].copy_(self._ranges_cpu[:B], non_blocking=True)
            self.limit[:B].copy_(self._limit_cpu[:B], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.used = S
        self.req_ids = req_ids
        self.version += 1
        self.ranges_version += 1

    def publish_limits(self, limit: np.ndarray) -> None:
        """A step of the requests of the last publish, in the same rows (their ranges unchanged):
        only the write limits change. limit: [B] last writable target position."""
        if self._copied is not None:
            self._copied.synchronize()
        B = len(limit)
        self._limit_np[:B] = limit
        if self.device.type != "cpu":
            self.limit[:B].copy_(self._limit_cpu[:B], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.version += 1


def max_spans(vllm_config, cap: int = 64) -> int:
    """Images (and videos) one prompt may hold, as configured (vLLM's default is 999: capped)."""
    mm = getattr(vllm_config.model_config, "multimodal_config", None)
    if mm is None:
        return 1
    return max(1, min(cap, sum(mm.get_limit_per_prompt(m) for m in ("image", "video"))))


def kv_views(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the layer as [num_blocks, block_size, num_kv_heads, head_dim] strided views."""
    assert kv_cache.dim() == 4 and kv_cache.shape[-1] == 2 * head_dim, tuple(kv_cache.shape)
    return kv_cache[..., :head_dim].transpose(1, 2), kv_cache[..., head_dim:].transpose(1, 2)


@dataclasses.dataclass
class HiViSDraftAttentionMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B + 1] drafter rows per request
    seq_lens: torch.Tensor  # [B] drafter sequence lengths
    block_table: torch.Tensor  # [B, max_blocks] the KV group's (target's) block table
    ranges: torch.Tensor  # [B, S, 2] dropped target ranges per request (contiguous: the whole buffer width)
    limit: torch.Tensor  # [B] last target position each request may write
    used_ranges: int = 1  # the batch's largest number of ranges (the torch path walks only these)
    version: int = -1  # DropRanges.version this metadata was built under (-1: no per-step caching)
    ranges_version: int = -1  # DropRanges.ranges_version: equal versions, equal ranges
    req_ids: tuple | None = None  # the batch's requests, row by row, if known (host side, CPU path)


class HiViSDraftAttentionMetadataBuilder(AttentionMetadataBuilder[HiViSDraftAttentionMetadata]):
    # The impl captures (no host sync on the GPU path) for uniform batches; this level also keeps
    # the target's own FULL graphs (vLLM takes the minimum over every builder of the runner).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
    reorder_batch_threshold: int | None = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._empty = torch.zeros(0, 1, 2, dtype=torch.int32, device=device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HiViSDraftAttentionMetadata:
        # Also called by the target's runner every step (its result unused there): keep it cheap.
        cm, B = common_attn_metadata, common_attn_metadata.num_reqs
        drops = DropRanges.current
        return HiViSDraftAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len, max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc, seq_lens=cm.seq_lens, block_table=cm.block_table_tensor,
            ranges=drops.ranges[:B] if drops is not None else self._empty.expand(B, 1, 2).contiguous(),
            limit=drops.limit[:B] if drops is not None else torch.full((B,), NO_LIMIT, dtype=torch.int32,
                                                                        device=cm.seq_lens.device),
            used_ranges=drops.used if drops is not None else 1, version=drops.version if drops is not None else -1,
            ranges_version=drops.ranges_version if drops is not None else -1,
            req_ids=drops.req_ids if drops is not None else None)


class HiViSDraftAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # the impl writes K/V itself (translated slots)
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls():
        return HiViSDraftAttentionImpl

    @staticmethod
    def get_builder_cls():
        return HiViSDraftAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(1)]  # whatever the target's backend needs

    @classmethod
    def supported_kv_cache_layouts(cls):
        return None  # whatever the target's backend needs (kv_views reads any)


class HiViSDraftAttentionImpl(AttentionImpl[HiViSDraftAttentionMetadata]):
    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **extra):
        # (AttentionImpl.__init__ must not be called: vLLM's base raises; __new__ sets its fields)
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise ValueError("the hivis drafter's attention has no ALiBi, sliding window or soft cap")
        assert attn_type == AttentionType.DECODER and kv_sharing_target_layer_name is None
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self._step: StepKV | None = None  # CPU path: this step's drafter-space keys (draft_attention_cpu.py)

    def _forward_cpu(self, md: HiViSDraftAttentionMetadata, q, k, v, kv_cache, out) -> None:
        """q, out: [T, Hq, D]; k, v: [T, H, D]; kv_cache: [num_blocks, H, block_size, 2D].
        A new step (version, batch or block table) starts with its first pass: that pass builds
        the step's copy (or carries the last one over) and writes its rows to the cache too; the
        draft passes after it write the copy only (serving/draft_attention_cpu.py)."""
        st = self._step
        if (st is not None and md.max_query_len == 1 and md.version >= 0
                and st.key == (md.version, q.shape[0], md.block_table.data_ptr(), md.block_table.shape)):
            # a draft pass of this step (one row per request, at seq_len - 1)
            L = int(md.seq_lens.numpy().max())
            if st.width < L:
                st = self._step = st.grown(md, L)
            st.draft_pass(q, k, v, out, md, self.num_kv_heads, self.scale)
            return
        qsl, seq, req, pos = pass_rows(md)
        key = (md.version, len(seq), md.block_table.data_ptr(), md.block_table.shape)
        first = md.version < 0 or st is None or st.key != key
        if first:
            q_lens, req_ids = np.diff(qsl), md.req_ids if md.version >= 0 else None
            st = None if st is None else st.carry(key, md, kv_cache, q_lens, req_ids)
            if st is None:
                st = StepKV.build(key, md, kv_cache, q_lens, req_ids)
        elif st.width < int(seq.max()):
            st = st.grown(md, int(seq.max()))
        self._step = st
        st.write(kv_cache, req, pos, k, v, to_cache=first)
        st.attend(q, out, md, self.num_kv_heads, self.scale)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None, **_):
        # query: [T_pad, Hq, D]; key, value: [T_pad, H, D]; output: [T_pad, Hq, D], written in place
        assert output_scale is None and output_block_scale is None
        md = attn_metadata
        if md is None or kv_cache.numel() == 0:  # profile / dummy runs
            return output
        T = md.num_actual_tokens
        query = query.view(-1, self.num_heads, self.head_size)
        key = key.view(-1, self.num_kv_heads, self.head_size)
        value = value.view(-1, self.num_kv_heads, self.head_size)
        out = output.view(-1, self.num_heads, self.head_size)
        if query.is_cuda:  # Triton: no host sync (CUDA-graph capturable)
            from vllm_hivis.kernels.kv_write import write_kv_mapped
            from vllm_hivis.kernels.tree_attention import tree_attention

            k_cache, v_cache = kv_views(kv_cache, self.head_size)
            # one launch each: the writes translate positions in-kernel too (no per-range torch ops)
            write_kv_mapped(key[:T], value[:T], k_cache, v_cache, md.block_table, md.seq_lens, md.query_start_loc,
                            md.ranges, md.limit, max_q_len=md.max_query_len)
            tree_attention(query[:T].contiguous(), k_cache, v_cache, md.block_table, md.seq_lens,
                           md.query_start_loc, None, None, self.scale, use_tree_mask=False,
                           max_q_len=md.max_query_len, out=out[:T], drop_ranges=md.ranges)
        else:
            self._forward_cpu(md, query[:T], key[:T], value[:T], kv_cache, out[:T])
        return output
