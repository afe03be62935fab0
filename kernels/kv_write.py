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
    assert k.dim() == 3 and k.shape == v.shape, f"k/v must be [T, H, D] alike, got {tuple(k.shape)}, {tuple(v.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() \
        and k_cache.stride(3) == 1, f"caches must be [num_blocks, block_size, H, D] alike, got {k_cache.stride()}"
    assert k_cache.shape[2:] == k.shape[1:], f"heads/dim differ: {tuple(k.shape)} vs {tuple(k_cache.shape)}"
    assert slots.shape == (k.shape[0],) and slots.dtype == torch.int64, "slots must be int64 [T]"


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
