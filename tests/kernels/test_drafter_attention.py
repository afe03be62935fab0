"""The hivis drafter's attention path: paged attention through a position map (kernels/
tree_attention.py with ``drop_ranges``), KV writes at translated slots (kernels/kv_write.py), on
caches laid out as vLLM hands them to a layer ([num_blocks, heads, block_size, 2 * head_dim], K and
V its two halves), and the serving backend's torch path against the kernel's reference.

Metamorphic: attention over a sequence stored with gaps at its target positions, read through the
position map, equals plain causal attention over the same sequence stored contiguously.
"""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from vllm_hivis.kernels.kv_write import write_kv, write_kv_ref  # noqa: E402
from vllm_hivis.kernels.tree_attention import tree_attention, tree_attention_ref  # noqa: E402
from vllm_hivis.method.plan import target_positions  # noqa: E402

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def vllm_layout_cache(num_blocks, block_size, heads, dim, dtype, gen):
    """A layer's KV as vLLM hands it over, [num_blocks, heads, block_size, 2 * dim] (CPU_ATTN's
    LBHNC), NaN-filled, and its K / V views [num_blocks, block_size, heads, dim] (strided)."""
    kv = torch.full((num_blocks, heads, block_size, 2 * dim), float("nan"), dtype=dtype)
    return kv, kv[..., :dim].transpose(1, 2), kv[..., dim:].transpose(1, 2)


def test_target_positions_worked_example():
    ranges = torch.tensor([[1, 4], [6, 8]], dtype=torch.int32)
    assert target_positions(torch.tensor([0, 1, 2, 3]), ranges).tolist() == [0, 4, 5, 8]
    pad = torch.tensor([[1, 4], [0, 0]], dtype=torch.int32)  # padding ranges change nothing
    assert target_positions(torch.tensor([0, 1, 5]), pad).tolist() == [0, 4, 8]


def case(gen, dtype, heads=4, kv_heads=2, dim=32, block_size=16):
    """Two requests with dropped ranges; K/V written at target positions through write_kv, and the
    same sequences written contiguously (compressed) into a second cache."""
    lens = [37, 21]  # drafter (compressed) sequence lengths
    q_lens = [5, 1]
    ranges = torch.tensor([[[3, 19], [25, 30]], [[0, 8], [0, 0]]], dtype=torch.int32)  # target [lo, hi)
    num_blocks = 24
    perm = torch.randperm(num_blocks, generator=gen)
    table = perm[:12].view(2, 6).to(torch.int32)  # 6 blocks of 16 each: target positions < 96
    kv_s, k_s, v_s = vllm_layout_cache(num_blocks, block_size, kv_heads, dim, dtype, gen)  # sparse (target)
    kv_c, k_c, v_c = vllm_layout_cache(num_blocks, block_size, kv_heads, dim, dtype, gen)  # compact
    keys = [torch.randn(L, kv_heads, dim, generator=gen).to(dtype) for L in lens]
    vals = [torch.randn(L, kv_heads, dim, generator=gen).to(dtype) for L in lens]
    for r, L in enumerate(lens):
        c = torch.arange(L)
        for cache_k, cache_v, pos in ((k_s, v_s, target_positions(c, ranges[r])), (k_c, v_c, c)):
            slots = table[r, pos // block_size].long() * block_size + pos % block_size
            write_kv_ref(keys[r], vals[r], cache_k, cache_v, slots)
    q = torch.randn(sum(q_lens), heads, dim, generator=gen).to(dtype)
    args = dict(block_table=table, seq_lens=torch.tensor(lens, dtype=torch.int32),
                query_start_loc=torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32),
                tree_mask=None, mask_indptr=None, scale=dim ** -0.5, use_tree_mask=False)
    return q, (k_s, v_s), (k_c, v_c), ranges, args, kv_s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_position_mapped_attention_equals_compact_causal_attention(dtype, device):
    gen = torch.Generator().manual_seed(0)
    q, sparse, compact, ranges, args, _ = case(gen, dtype)
    to = lambda t: t.to(device) if torch.is_tensor(t) else t  # noqa: E731
    a = {k: to(v) for k, v in args.items()}
    want = tree_attention_ref(to(q), *map(to, compact), **a)
    ref = tree_attention_ref(to(q), *map(to, sparse), **a, drop_ranges=to(ranges))
    got = tree_attention(to(q), *map(to, sparse), **a, drop_ranges=to(ranges))
    torch.testing.assert_close(ref, want, **TOL[dtype])  # the map reads exactly the kept rows
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
    assert not torch.isnan(got.float()).any()  # never read a gap (NaN) slot


@pytest.mark.parametrize("head_dim", [32, 128])
def test_kv_write_kernel_matches_reference(head_dim, device):
    gen = torch.Generator().manual_seed(1)
    kv_a, ka, va = vllm_layout_cache(10, 16, 2, head_dim, torch.float16, gen)
    kv_b, kb, vb = vllm_layout_cache(10, 16, 2, head_dim, torch.float16, gen)
    k = torch.randn(7, 2, head_dim, generator=gen)
    v = torch.randn(7, 2, head_dim, generator=gen)
    slots = torch.tensor([3, -1, 40, 17, -1, 159, 0])
    write_kv_ref(k, v, ka, va, slots)
    kv_b = kv_b.to(device)
    kb, vb = kv_b[..., :head_dim].transpose(1, 2), kv_b[..., head_dim:].transpose(1, 2)
    write_kv(k.to(device), v.to(device), kb, vb, slots.to(device))
    torch.testing.assert_close(kv_b.cpu(), kv_a, equal_nan=True)
    assert torch.isnan(kv_a).sum() == kv_a.numel() - 5 * 2 * 2 * head_dim  # only the 5 real rows written


def test_the_serving_backends_torch_path_equals_the_kernels_reference():
    """serving/draft_attention.attend_torch (the CPU path) == tree_attention_ref with the map, and
    its slot table gives each new row the slot the GPU path's write_slots gives it."""
    from types import SimpleNamespace

    from vllm_hivis.serving.draft_attention import NO_LIMIT, StepTable, attend_torch, key_slots, rows, write_slots

    gen = torch.Generator().manual_seed(2)
    q, sparse, _, ranges, args, kv = case(gen, torch.float32)
    md = SimpleNamespace(query_start_loc=args["query_start_loc"], seq_lens=args["seq_lens"],
                         block_table=args["block_table"], ranges=ranges, used_ranges=2, max_seq_len=37,
                         max_query_len=5, limit=torch.tensor([NO_LIMIT, NO_LIMIT], dtype=torch.int32))
    keys = lambda: key_slots(md, StepTable.build(("k",), md, 37, 16).slots)  # noqa: E731
    got = attend_torch(md, q, kv, args["scale"], q.shape[0], keys())
    want = tree_attention_ref(q, *sparse, **args, drop_ranges=ranges)
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=2e-5)
    # new rows write at their target slots; request 1's row (target position 28) is past its limit
    md.limit = torch.tensor([60, 27], dtype=torch.int32)
    slots = write_slots(md, q.shape[0], 16)
    c = torch.tensor([32, 33, 34, 35, 36])  # request 0's new rows (bottom-right): compressed positions
    p = target_positions(c, ranges[0])
    assert slots[:5].tolist() == (args["block_table"][0, p // 16].long() * 16 + p % 16).tolist()
    assert slots[5].item() == -1
    req, pos = rows(md, q.shape[0])
    assert keys()[req, pos].tolist() == slots.tolist()


def test_the_draft_pass_fast_path_equals_the_general_path():
    """attend_decode_torch (a draft pass: one new row per request) writes the same cache and
    returns the same rows as write_kv_ref + attend_torch, limits included."""
    from types import SimpleNamespace

    from vllm_hivis.serving.draft_attention import (
        StepTable,
        attend_decode_torch,
        attend_torch,
        key_slots,
        kv_views,
        rows,
    )

    gen = torch.Generator().manual_seed(3)
    _, _, _, ranges, args, kv = case(gen, torch.float32)
    # request 1's new row (target position 28) past its limit; equal lengths: the unmasked path
    for limit, lens in (([10**6] * 2, [37, 21]), ([60, 27], [37, 21]), ([10**6] * 2, [21, 21])):
        md = SimpleNamespace(query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
                             seq_lens=torch.tensor(lens, dtype=torch.int32),
                             block_table=args["block_table"], ranges=ranges, used_ranges=2, max_seq_len=max(lens),
                             max_query_len=1, limit=torch.tensor(limit, dtype=torch.int32))
        q, k, v = (torch.randn(2, n, 32, generator=gen) for n in (4, 2, 2))
        kv_a, kv_b = kv.clone(), kv.clone()
        table = StepTable.build(("k",), md, 37 + 5, 16)
        # the table against its formula: slot of key c = block_table[r, p // 16] * 16 + p % 16 at
        # p = target position of c, -1 past the request's limit
        p = target_positions(torch.arange(42).expand(2, 42), ranges[:, None])
        want_slots = args["block_table"].long().gather(1, p // 16) * 16 + p % 16
        want_slots = torch.where(p <= md.limit.long()[:, None], want_slots, -1)
        assert torch.equal(table.slots, want_slots)
        valid = want_slots >= 0
        assert torch.equal(table.valid, valid) and torch.equal(table.arange, torch.arange(42))
        assert torch.equal(table.block, torch.where(valid, want_slots // 16, 0))
        assert torch.equal(table.offset, torch.where(valid, want_slots % 16, 0))
        got = attend_decode_torch(md, q, k, v, kv_a, args["scale"], table)
        keys = key_slots(md, table.slots)
        req, pos = rows(md, 2)
        write_kv_ref(k, v, *kv_views(kv_b, 32), keys[req, pos])
        want = attend_torch(md, q, kv_b, args["scale"], 2, keys)
        torch.testing.assert_close(kv_a, kv_b, equal_nan=True)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
