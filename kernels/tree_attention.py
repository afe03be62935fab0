"""Paged-KV attention for verifying (or drafting) a token tree.

Vocabulary
----------
request      one sequence of the batch; ``r`` indexes requests.
new tokens   the ``q_r = query_start_loc[r+1] - query_start_loc[r]`` tokens of request ``r`` that are
             computed in this step (the nodes of a token tree, a chain of drafts, or a prefill
             chunk). Their queries are packed over requests in ``q``; their K/V are ALREADY written
             into the paged cache at logical positions ``prefix_len, ..., seq_len - 1``.
prefix       the committed tokens of request ``r``: logical positions ``0 .. prefix_len - 1`` with
             ``prefix_len = seq_lens[r] - q_r``. Every new token attends to the whole prefix.
page / slot  the KV cache is paged: logical position ``p`` of request ``r`` lives in physical block
             ``block_table[r, p // block_size]`` at offset ``p % block_size`` (a "slot").
tree mask    per request a ``[q_r, q_r]`` 0/1 matrix, row-major, ``mask[i, j] = 1`` iff new token
             ``j`` is an ancestor of new token ``i`` or ``i`` itself. The matrices of all requests
             are flattened and concatenated; request ``r``'s starts at ``mask_indptr[r]`` (the
             layout of SGLang's ``custom_mask`` / ``mask_indptr``). The diagonal must be set.
causal       ``USE_TREE_MASK=False``: new token ``i`` sees new tokens ``j <= i`` (chain
             verification, chunked prefill); no mask tensor is read.
GQA          ``num_heads = group * num_kv_heads``; query head ``h`` reads KV head ``h // group``.
position map optional (``drop_ranges``, the hivis drafter): the logical positions above are
             *compressed* ones and request ``r``'s K/V live at the *storage* position that skips the
             dropped ranges ``drop_ranges[r]`` ([S, 2] sorted [lo, hi) storage positions): c -> p,
             each range at or before p shifts it past (``vllm_hivis.method.plan.target_positions``).
             Masks and causality stay in logical positions.
caches       [num_blocks, block_size, num_kv_heads, head_dim] with any strides but a contiguous
             head_dim (e.g. the K and V halves of vLLM's [num_blocks, heads, block_size, 2 * dim]).

The kernel runs one program per (request, KV head, tile of ``BLOCK_M`` new tokens); the rows of a
program are the ``BLOCK_M x group`` (query token, query head) pairs that share the KV head, so each
K/V tile is loaded once per group. Softmax is online (flash-attention style) in float32.
"""

import os

import torch
import triton
import triton.language as tl

from vllm_hivis.method.plan import target_positions


@triton.jit
def _tree_attention_kernel(
    q_ptr,  # [num_q_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [num_q_tokens, num_heads, head_dim]
    block_table_ptr,  # [num_reqs, max_blocks_per_req] int32
    seq_lens_ptr,  # [num_reqs] int32
    query_start_loc_ptr,  # [num_reqs + 1] int32
    tree_mask_ptr,  # [sum_r q_r * q_r] uint8 (unused unless USE_TREE_MASK)
    mask_indptr_ptr,  # [num_reqs + 1] int32 (unused unless USE_TREE_MASK)
    drop_ranges_ptr,  # [num_reqs, NUM_RANGES, 2] int32 (unused unless NUM_RANGES > 0)
    scale,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_kv_block, stride_kv_slot, stride_kv_head, stride_bt_req,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TREE_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NUM_RANGES: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    prefix_len = seq_len - q_len

    # Rows = (query token i of this tile, query head of this KV group) pairs.
    rows = tl.arange(0, BLOCK_M * GROUP_PAD)
    q_idx = tile * BLOCK_M + rows // GROUP_PAD  # index of the query among the new tokens
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q_tok = (q_start + q_idx).to(tl.int64)
    q_offs = q_tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M * GROUP_PAD], -1e30, dtype=tl.float32)  # running row max (finite)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M * GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    if USE_TREE_MASK:
        kv_end = seq_len
        mask_start = tl.load(mask_indptr_ptr + req).to(tl.int64)
    else:  # causal: no query of this tile sees past its own last new token
        kv_end = tl.minimum(seq_len, prefix_len + (tile + 1) * BLOCK_M)
    for kv_start in range(0, kv_end, BLOCK_N):
        kv_pos = kv_start + tl.arange(0, BLOCK_N)  # logical positions in the request
        kv_ok = kv_pos < kv_end
        store_pos = kv_pos
        for s in tl.static_range(NUM_RANGES):  # compressed -> storage position (see module doc)
            lo = tl.load(drop_ranges_ptr + (req * NUM_RANGES + s) * 2)
            hi = tl.load(drop_ranges_ptr + (req * NUM_RANGES + s) * 2 + 1)
            store_pos = tl.where(store_pos >= lo, store_pos + (hi - lo), store_pos)
        block = tl.load(block_table_ptr + req * stride_bt_req + store_pos // PAGE_SIZE, mask=kv_ok, other=0)
        kv_offs = (block.to(tl.int64) * stride_kv_block + (store_pos % PAGE_SIZE) * stride_kv_slot
                   + kv_head * stride_kv_head)
        kv_mask = kv_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + kv_offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * scale  # [rows, BLOCK_N] fp32
        new_j = kv_pos - prefix_len  # index among the new tokens; < 0 inside the prefix
        if USE_TREE_MASK:
            m_offs = mask_start + q_idx[:, None].to(tl.int64) * q_len + new_j[None, :]
            m_ok = row_ok[:, None] & (new_j >= 0)[None, :] & kv_ok[None, :]
            sees_new = tl.load(tree_mask_ptr + m_offs, mask=m_ok, other=0) != 0
        else:
            sees_new = new_j[None, :] <= q_idx[:, None]
        visible = kv_ok[None, :] & ((new_j < 0)[None, :] | sees_new)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # fully masked rows (padding) -> 0
    o_offs = q_tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _dot_dtype(q: torch.Tensor):
    """Operand dtype of tl.dot: the input dtype, except bf16 under the Triton interpreter (CPU), which
    stores bf16 as raw uint16 in numpy so that its dot would multiply bit patterns: there float32."""
    interpreted = q.device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") == "1"
    if q.dtype == torch.bfloat16 and interpreted:
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[q.dtype]


def _check_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, tree_mask,
                  mask_indptr, use_tree_mask, drop_ranges=None):
    assert q.dim() == 3, f"q must be [num_q_tokens, num_heads, head_dim], got shape {tuple(q.shape)}"
    assert k_cache.dim() == 4, (
        f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(k_cache.shape)}")
    assert k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}"
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"q dtype {q.dtype} unsupported"
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, (
        f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    for name, t in (("q", q), ("block_table", block_table)):
        assert t.is_contiguous(), f"{name} must be contiguous"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, (
        f"k_cache and v_cache must share strides with a contiguous head_dim, got {k_cache.stride()}, "
        f"{v_cache.stride()}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    assert k_cache.shape[3] == head_dim, f"head_dim mismatch: q {head_dim}, cache {k_cache.shape[3]}"
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}"
    assert block_table.dim() == 2 and block_table.dtype == torch.int32, (
        f"block_table must be int32 [num_reqs, max_blocks_per_req], got {block_table.dtype} {tuple(block_table.shape)}")
    num_reqs = block_table.shape[0]
    assert seq_lens.shape == (num_reqs,) and seq_lens.dtype == torch.int32, (
        f"seq_lens must be int32 [num_reqs={num_reqs}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    assert query_start_loc.shape == (num_reqs + 1,) and query_start_loc.dtype == torch.int32, (
        f"query_start_loc must be int32 [num_reqs+1={num_reqs + 1}], got "
        f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}")
    if use_tree_mask:
        assert tree_mask is not None and mask_indptr is not None, "use_tree_mask=True needs tree_mask and mask_indptr"
        assert tree_mask.dim() == 1 and tree_mask.dtype in (torch.bool, torch.uint8) and tree_mask.is_contiguous(), (
            f"tree_mask must be a contiguous 1-D bool/uint8 tensor, got {tree_mask.dtype} {tuple(tree_mask.shape)}")
        assert mask_indptr.shape == (num_reqs + 1,) and mask_indptr.dtype == torch.int32, (
            f"mask_indptr must be int32 [num_reqs+1={num_reqs + 1}], got "
            f"{mask_indptr.dtype} {tuple(mask_indptr.shape)}")
    tensors = [q, k_cache, v_cache, block_table, seq_lens, query_start_loc]
    tensors += [tree_mask, mask_indptr] if use_tree_mask else []
    if drop_ranges is not None:
        assert drop_ranges.dim() == 3 and drop_ranges.shape[0] == num_reqs and drop_ranges.shape[2] == 2 \
            and drop_ranges.dtype == torch.int32 and drop_ranges.is_contiguous(), (
                f"drop_ranges must be contiguous int32 [num_reqs={num_reqs}, S, 2], got "
                f"{drop_ranges.dtype} {tuple(drop_ranges.shape)}")
        tensors.append(drop_ranges)
    assert all(t.device == q.device for t in tensors), "all inputs must be on the same device"


def tree_attention(
    q: torch.Tensor,  # [num_q_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32, prefix + new tokens
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    tree_mask: torch.Tensor | None,  # [sum_r q_r * q_r] bool/uint8, or None when causal
    mask_indptr: torch.Tensor | None,  # [num_reqs + 1] int32, or None when causal
    scale: float,
    use_tree_mask: bool = True,
    *,
    max_q_len: int | None = None,  # max_r q_r; computed from query_start_loc (a host sync) if None
    out: torch.Tensor | None = None,  # [num_q_tokens, num_heads, head_dim], written in place
    drop_ranges: torch.Tensor | None = None,  # [num_reqs, S, 2] int32 position map (module doc)
) -> torch.Tensor:  # [num_q_tokens, num_heads, head_dim]
    """Attention of every new token over its prefix and its tree ancestors (see module doc)."""
    _check_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, tree_mask,
                  mask_indptr, use_tree_mask, drop_ranges)
    num_q_tokens, num_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), "out must be like q"
    num_reqs = block_table.shape[0]
    if max_q_len is None:
        max_q_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item()) if num_reqs else 0
    if num_q_tokens == 0 or max_q_len == 0:
        return out
    if use_tree_mask:
        tree_mask = tree_mask.view(torch.uint8) if tree_mask.dtype == torch.bool else tree_mask
    else:  # never read: the pointers only need to be valid tensors
        tree_mask, mask_indptr = query_start_loc, query_start_loc
    num_ranges = 0 if drop_ranges is None else drop_ranges.shape[1]
    drop_ranges = query_start_loc if drop_ranges is None else drop_ranges

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(16 // group_pad, min(64 // group_pad, triton.next_power_of_2(max_q_len)), 1)
    grid = (num_reqs, num_kv_heads, triton.cdiv(max_q_len, block_m))
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, out, block_table, seq_lens, query_start_loc, tree_mask, mask_indptr, drop_ranges,
        float(scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        GROUP=group, GROUP_PAD=group_pad,
        PAGE_SIZE=page_size, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=32,
        USE_TREE_MASK=use_tree_mask, DOT_DTYPE=_dot_dtype(q),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # no TF32 rounding for fp32
        NUM_RANGES=num_ranges,
    )
    return out


def tree_attention_ref(
    q: torch.Tensor,  # [num_q_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    tree_mask: torch.Tensor | None,  # [sum_r q_r * q_r] bool/uint8, or None when causal
    mask_indptr: torch.Tensor | None,  # [num_reqs + 1] int32, or None when causal
    scale: float,
    use_tree_mask: bool = True,
    drop_ranges: torch.Tensor | None = None,  # [num_reqs, S, 2] int32 position map (module doc)
) -> torch.Tensor:  # [num_q_tokens, num_heads, head_dim]
    """Plain-torch reference: gather each request's K/V, build its mask, softmax in float32."""
    _check_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, tree_mask,
                  mask_indptr, use_tree_mask, drop_ranges)
    page_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    for r in range(block_table.shape[0]):
        q0, q1, seq_len = int(query_start_loc[r]), int(query_start_loc[r + 1]), int(seq_lens[r])
        q_len = q1 - q0
        prefix_len = seq_len - q_len
        assert q_len >= 0 and prefix_len >= 0, f"request {r}: q_len {q_len} > seq_len {seq_len}"
        pos = torch.arange(seq_len, device=q.device)
        if drop_ranges is not None:
            pos = target_positions(pos, drop_ranges[r])
        blocks = block_table[r, pos // page_size].long()
        k = k_cache[blocks, pos % page_size].float().repeat_interleave(group, dim=1)  # [seq_len, heads, dim]
        v = v_cache[blocks, pos % page_size].float().repeat_interleave(group, dim=1)  # [seq_len, heads, dim]
        if use_tree_mask:
            m0 = int(mask_indptr[r])
            assert int(mask_indptr[r + 1]) - m0 == q_len * q_len, f"request {r}: mask size != q_len^2"
            new_mask = tree_mask[m0:m0 + q_len * q_len].view(q_len, q_len).bool()
        else:
            new_mask = torch.ones(q_len, q_len, dtype=torch.bool, device=q.device).tril()
        prefix_mask = torch.ones(q_len, prefix_len, dtype=torch.bool, device=q.device)
        allowed = torch.cat([prefix_mask, new_mask], dim=1)  # [q_len, seq_len]
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
