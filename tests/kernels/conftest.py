"""Shared setup for the Triton kernel tests.

Without a CUDA GPU the kernels run under the Triton interpreter, which must be switched on BEFORE
triton is first imported: scripts/test.sh runs this room in its own process with TRITON_INTERPRET=1
on such machines (and 0 on a GPU, for the compiled kernels). This conftest only fills in the same
choice when the variable is unset (a plain `pytest tests/kernels`).
"""

import os
import types

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"


@pytest.fixture
def device() -> str:
    if os.environ["TRITON_INTERPRET"] == "1":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 needs a CUDA device")
    return "cuda"


def page_kv(ks, vs, block_size, gen, spare_blocks=3):
    """Scatter contiguous per-request K/V into a paged cache.

    ks, vs: lists over requests of [seq_len_r, num_kv_heads, head_dim] tensors. The cache blocks of
    all requests are a random permutation of the cache (genuinely scattered paging), and every cache
    entry that belongs to no request (spare blocks, tails of last blocks) is NaN, so any read outside
    a request's KV shows up as NaN in the output. Unused block-table entries point at a spare block.
    Returns k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] and block_table
    [num_reqs, max_blocks_per_req] int32.
    """
    num_kv_heads, head_dim, dtype = ks[0].shape[1], ks[0].shape[2], ks[0].dtype
    blocks_per_req = [-(-k.shape[0] // block_size) for k in ks]
    num_blocks = sum(blocks_per_req) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    block_table = torch.full((len(ks), max(max(blocks_per_req), 1)), int(perm[-1]), dtype=torch.int32)
    used = 0
    for r, (k, v) in enumerate(zip(ks, vs)):
        blocks = perm[used:used + blocks_per_req[r]]
        used += blocks_per_req[r]
        block_table[r, :len(blocks)] = blocks.to(torch.int32)
        pos = torch.arange(k.shape[0])
        k_cache[blocks[pos // block_size], pos % block_size] = k
        v_cache[blocks[pos // block_size], pos % block_size] = v
    return k_cache, v_cache, block_table


def read_paged(cache, block_table, r, positions):
    """Rows [len(positions), num_kv_heads, head_dim] of request r at the given logical positions."""
    block_size = cache.shape[1]
    positions = torch.as_tensor(positions, device=cache.device)
    return cache[block_table[r, positions // block_size].long(), positions % block_size]


@pytest.fixture
def paged():
    """The paging helpers above, for the test modules (conftest is not imported directly)."""
    return types.SimpleNamespace(page_kv=page_kv, read_paged=read_paged)
