"""Write new K/V rows into a paged cache at given slots, skipping slot -1 (no host sync: a masked
store, so it can run inside a captured CUDA graph).

    slot   flat index block * block_size + offset into a cache viewed [num_blocks, block_size,
           num_kv_heads, head_dim] (any strides, contiguous head_dim); -1 = do not write this row.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr,  # [T, H, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, H, D] (strided)
    slots_ptr,  # [T] int64, -1 = skip
    stride_t, stride_h,  # of k / v (the same)
    stride_block, stride_slot, stride_head,  # of the caches (the same)
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    ok = (heads < NUM_HEADS) & (dims < HEAD_DIM) & (slot >= 0)
    safe = tl.maximum(slot, 0)
    src = t.to(tl.int64) * stride_t + heads * stride_h + dims
    dst = (safe // PAGE_SIZE) * stride_block + (safe % PAGE_SIZE) * stride_slot + heads * stride_head + dims
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src, mask=ok), mask=ok)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src, mask=ok), mask=ok)


def _check(k, v, k_cache, v_cache, slots):
    _check_layout(k, v, k_cache, v_cache)
    assert slots.shape == (k.shape[0],) and slots.dtype == torch.int64, "slots must be int64 [T]"


def _check_layout(k, v, k_cache, v_cache):
    assert k.dim() == 3 and k.shape == v.shape, f"k/v must be [T, H, D] alike, got {tuple(k.shape)}, {tuple(v.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() \
        and k_cache.stride(3) == 1, f"caches must be [num_blocks, block_size, H, D] alike, got {k_cache.stride()}"
    assert k_cache.shape[2:] == k.shape[1:], f"heads/dim differ: {tuple(k.shape)} vs {tuple(k_cache.shape)}"


def write_kv(
    k: torch.Tensor,  # [T, H, D]
    v: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H, D], written in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, H, D], written in place
    slots: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    _check(k, v, k_cache, v_cache, slots)
    if k.shape[0] == 0:
        return
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if k.stride() != v.stride() or k.stride(2) != 1:  # the kernel takes one set of row strides
        k, v = k.contiguous(), v.contiguous()
    H, D = k.shape[1], k.shape[2]
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=H, HEADS_PAD=triton.next_power_of_2(H), HEAD_DIM=D, DIM_PAD=triton.next_power_of_2(D),
        PAGE_SIZE=k_cache.shape[1])


def write_kv_ref(k, v, k_cache, v_cache, slots) -> None:
    """Torch reference of ``write_kv``."""
    _check(k, v, k_cache, v_cache, slots)
    ok = slots >= 0
    s = slots[ok]
    block_size = k_cache.shape[1]
    k_cache[s // block_size, s % block_size] = k[ok].to(k_cache.dtype)
    v_cache[s // block_size, s % block_size] = v[ok].to(v_cache.dtype)


# -- writes through the hivis drafter's position map ------------------------------------------
# The drafter's new rows are at compressed (drafter) positions; their K/V live at the *target*
# position of each row (vllm_hivis/serving/draft_attention.py). This kernel does the whole
# translation in one launch: request r's q_r new rows (query_start_loc) are at compressed
# positions seq_len - q_r + j (bottom-right, as vLLM's attention), c -> p through the request's
# sorted dropped ranges [lo, hi) (each one at or before p shifts it past), slot = block_table[r,
# p // block_size] * block_size + p % block_size; rows with p past the request's limit are skipped.


@triton.jit
def _write_kv_mapped_kernel(
    k_ptr, v_ptr,  # [T, H, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, H, D] (strided)
    block_table_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32 compressed sequence lengths (the new rows included)
    query_start_loc_ptr,  # [B + 1] int32
    ranges_ptr,  # [B, NUM_RANGES, 2] int32 dropped target ranges, sorted; [0, 0) pads
    limit_ptr,  # [B] int32 last writable target position
    stride_t, stride_h,  # of k / v (the same)
    stride_block, stride_slot, stride_head,  # of the caches (the same)
    stride_bt, max_blocks,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_RANGES: tl.constexpr, BLOCK_T: tl.constexpr,
):
    r = tl.program_id(0)
    tile = tl.program_id(1)
    q0 = tl.load(query_start_loc_ptr + r)
    q_len = tl.load(query_start_loc_ptr + r + 1) - q0
    if tile * BLOCK_T >= q_len:
        return
    j = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = j < q_len
    p = (tl.load(seq_lens_ptr + r) - q_len + j).to(tl.int64)  # compressed positions ...
    for s in tl.static_range(NUM_RANGES):  # ... -> target positions
        lo = tl.load(ranges_ptr + (r * NUM_RANGES + s) * 2).to(tl.int64)
        hi = tl.load(ranges_ptr + (r * NUM_RANGES + s) * 2 + 1).to(tl.int64)
        p = tl.where(p >= lo, p + (hi - lo), p)
    row_ok = row_ok & (p <= tl.load(limit_ptr + r).to(tl.int64))
    blk = tl.load(block_table_ptr + r * stride_bt + tl.minimum(p // PAGE_SIZE, max_blocks - 1), mask=row_ok, other=0)
    heads = tl.arange(0, HEADS_PAD)[None, :, None]
    dims = tl.arange(0, DIM_PAD)[None, None, :]
    ok = row_ok[:, None, None] & (heads < NUM_HEADS) & (dims < HEAD_DIM)
    src = (q0 + j).to(tl.int64)[:, None, None] * stride_t + heads * stride_h + dims
    dst = (blk.to(tl.int64)[:, None, None] * stride_block + (p % PAGE_SIZE)[:, None, None] * stride_slot
           + heads * stride_head + dims)
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src, mask=ok), mask=ok)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src, mask=ok), mask=ok)


def _check_mapped(k, v, k_cache, v_cache, block_table, seq_lens, query_start_loc, ranges, limit):
    _check_layout(k, v, k_cache, v_cache)
    B = seq_lens.shape[0]
    assert query_start_loc.shape == (B + 1,) and limit.shape == (B,) and block_table.shape[0] >= B, \
        (tuple(query_start_loc.shape), tuple(limit.shape), tuple(block_table.shape), B)
    assert ranges.dim() == 3 and ranges.shape[0] >= B and ranges.shape[2] == 2 and ranges.is_contiguous(), \
        f"ranges must be contiguous [B, S, 2], got {tuple(ranges.shape)}"
    assert all(t.dtype == torch.int32 for t in (block_table, seq_lens, query_start_loc, ranges, limit)), \
        "block table, lengths, query_start_loc, ranges and limits must be int32"


def write_kv_mapped(
    k: torch.Tensor,  # [T, H, D] the new rows, packed by request
    v: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H, D], written in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, H, D], written in place
    block_table: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32 compressed lengths, the new rows included
    query_start_loc: torch.Tensor,  # [B + 1] int32
    ranges: torch.Tensor,  # [B, S, 2] int32 dropped target ranges [lo, hi), sorted
    limit: torch.Tensor,  # [B] int32 last writable target position
    max_q_len: int,  # the largest q_r (a host int: the launch grid)
    block_t: int = 16,
) -> None:
    """One launch, no host sync (CUDA-graph capturable for a fixed max_q_len)."""
    _check_mapped(k, v, k_cache, v_cache, block_table, seq_lens, query_start_loc, ranges, limit)
    B = seq_lens.shape[0]
    if k.shape[0] == 0 or B == 0:
        return
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if k.stride() != v.stride() or k.stride(2) != 1:
        k, v = k.contiguous(), v.contiguous()
    H, D = k.shape[1], k.shape[2]
    _write_kv_mapped_kernel[(B, triton.cdiv(max(1, max_q_len), block_t))](
        k, v, k_cache, v_cache, block_table, seq_lens, query_start_loc, ranges, limit,
        k.stride(0), k.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), block_table.shape[1],
        NUM_HEADS=H, HEADS_PAD=triton.next_power_of_2(H), HEAD_DIM=D, DIM_PAD=triton.next_power_of_2(D),
        PAGE_SIZE=k_cache.shape[1], NUM_RANGES=ranges.shape[1], BLOCK_T=block_t)


def mapped_slots(block_table, seq_lens, query_start_loc, ranges, limit, block_size: int) -> torch.Tensor:
    """[T] int64 slot of each new row at its target position, -1 past its request's limit (the
    plain-torch form of ``write_kv_mapped``'s translation)."""
    from vllm_hivis.method.plan import target_positions

    qsl = query_start_loc.long()
    q = qsl[1:] - qsl[:-1]
    T = int(qsl[-1])
    req = torch.repeat_interleave(torch.arange(len(q), device=qsl.device), q, output_size=T)
    c = seq_lens.long()[req] - q[req] + torch.arange(T, device=qsl.device) - qsl[req]
    p = target_positions(c, ranges[req])
    blk = block_table.long()[req, (p // block_size).clamp(max=block_table.shape[1] - 1)]
    return torch.where(p <= limit.long()[req], blk * block_size + p % block_size, -1)


def write_kv_mapped_ref(k, v, k_cache, v_cache, block_table, seq_lens, query_start_loc, ranges, limit,
                        max_q_len: int = 0) -> None:
    """Torch reference of ``write_kv_mapped``."""
    _check_mapped(k, v, k_cache, v_cache, block_table, seq_lens, query_start_loc, ranges, limit)
    B = seq_lens.shape[0]
    write_kv_ref(k, v, k_cache, v_cache,
                 mapped_slots(block_table[:B], seq_lens, query_start_loc, ranges[:B], limit, k_cache.shape[1]))
