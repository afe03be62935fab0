"""The hivis drafter's attention path: paged attention through a position map (kernels/
tree_attention.py with ``drop_ranges``), KV writes at translated slots (kernels/kv_write.py), on
caches laid out as vLLM hands them to a layer ([num_blocks, heads, block_size, 2 * head_dim], K and
V its two halves), and the serving backend's torch path against the kernel's reference.

Metamorphic: attention over a sequence stored with gaps at its target positions, read through the
position map, equals plain causal attention over the same sequence stored contiguously.
"""

import pytest

pytest.importorskip("triton")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vllm_hivis.kernels.kv_write import write_kv, write_kv_ref  # noqa: E402
from vllm_hivis.kernels.tree_attention import tree_attention, tree_attention_ref  # noqa: E402
from vllm_hivis.method.plan import target_positions  # noqa: E402
from vllm_hivis.serving.draft_attention import kv_views  # noqa: E402

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


def cpu_md(args, ranges, lens, q_lens, limit, version, req_ids=None, block_table=None, ranges_version=-1):
    from types import SimpleNamespace

    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return SimpleNamespace(query_start_loc=qsl, seq_lens=torch.tensor(lens, dtype=torch.int32),
                           block_table=args["block_table"] if block_table is None else block_table, ranges=ranges,
                           used_ranges=ranges.shape[1], max_seq_len=max(lens), max_query_len=max(q_lens),
                           num_actual_tokens=sum(q_lens), limit=torch.tensor(limit, dtype=torch.int32),
                           version=version, req_ids=req_ids, ranges_version=ranges_version)


def cpu_forward(impl, md, q, k, v, cache):
    """The backend's CPU path on one pass; q arrives as the engine hands it, a strided view of the
    fused QKV projection ([T, Hq, D] with a token stride past Hq * D)."""
    qkv = torch.cat([q.flatten(1), q.new_zeros(q.shape[0], 7)], dim=1)
    out = torch.full_like(q, float("nan"))
    impl._forward_cpu(md, qkv[:, : q[0].numel()].view(q.shape), k, v, cache, out)
    return out


def slots_at(args, ranges, req, c):
    p = target_positions(torch.as_tensor(c), ranges[req])
    return args["block_table"][req, p // 16].long() * 16 + p % 16


@pytest.mark.parametrize("limited,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.float16)])
def test_the_cpu_path_equals_the_kernels_reference_over_a_step(limited, dtype):
    """serving/draft_attention.py's CPU path over one step - a first pass (5 verified rows of
    request 0, 1 of request 1) and three draft passes (one row each) - returns what the kernel's
    torch reference returns with every row written at its target slot; the first pass's rows
    reach the paged cache at their target slots, the draft passes' rows stay in the step's copy.
    With limits: request 1's rows lie past its writable limit: never written to the cache, their
    outputs (discarded drafts) only finite. (bf16 is left out: vLLM's CPU kernel picks AMX for it
    where torch reports AMX, and this machine's AMX instructions fault, for vLLM's layers too.)"""
    from vllm_hivis.serving.draft_attention import NO_LIMIT, HiViSDraftAttentionImpl

    gen = torch.Generator().manual_seed(2)
    q, sparse, _, ranges, args, kv = case(gen, dtype)
    impl = HiViSDraftAttentionImpl(4, 32, args["scale"], num_kv_heads=2)
    lens, q_lens = [37, 21], [5, 1]
    # request 1 holds drafter positions 0..20 (target 0..28): limit 27 cuts its new row 20 (target
    # 28) and every later one (never written to the cache; their drafts are discarded)
    limit = [NO_LIMIT, 27] if limited else [NO_LIMIT, NO_LIMIT]
    # the first pass's rows: the K/V the case stored at their slots; the cache starts without them
    new = [(0, c) for c in range(32, 37)] + [(1, 20)]
    slots = torch.stack([slots_at(args, ranges, r, c) for r, c in new])
    k_cache, v_cache = kv_views(kv, 32)
    k_new, v_new = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
    want_cache = kv.clone()
    if limited:
        want_cache.view(-1, 2, 16, 64).transpose(1, 2).flatten(0, 1)[slots[-1]] = float("nan")
    cache = kv.clone()
    cache.view(-1, 2, 16, 64).transpose(1, 2).flatten(0, 1)[slots] = float("nan")
    ref = kv.clone()  # every row of the step at its target slot, for the reference

    def reference(q, lens, q_lens):
        a = dict(args, seq_lens=torch.tensor(lens, dtype=torch.int32),
                 query_start_loc=torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32))
        return tree_attention_ref(q, *kv_views(ref, 32), **a, drop_ranges=ranges)

    md = cpu_md(args, ranges, lens, q_lens, limit, version=7)
    got = cpu_forward(impl, md, q, k_new, v_new, cache)
    want = reference(q, lens, q_lens)
    rows = slice(0, 5) if limited else slice(None)  # request 1's rows past its limit: drafts discarded
    torch.testing.assert_close(got[rows], want[rows], **TOL[dtype])
    assert not torch.isnan(got).any()
    torch.testing.assert_close(cache, want_cache, equal_nan=True)  # the first pass's rows, at their slots
    after_first = cache.clone()
    for _ in range(3):  # draft passes: one row per request at drafter position seq_len - 1
        lens = [L + 1 for L in lens]
        md = cpu_md(args, ranges, lens, [1, 1], limit, version=7)
        qd, kd, vd = (torch.randn(2, n, 32, generator=gen).to(dtype) for n in (4, 2, 2))
        got = cpu_forward(impl, md, qd, kd, vd, cache)
        for r in range(2):
            if not (limited and r == 1):
                write_kv_ref(kd[r:r + 1], vd[r:r + 1], *kv_views(ref, 32), slots_at(args, ranges, r, [lens[r] - 1]))
        want = reference(qd, lens, [1, 1])
        # request 1's draft rows past its limit are discarded: finite is all they must be
        keep = slice(0, 1) if limited else slice(None)
        torch.testing.assert_close(got[keep], want[keep], **TOL[dtype])
        assert not torch.isnan(got).any()
    torch.testing.assert_close(cache, after_first, equal_nan=True)  # the draft rows never reach the cache
    # a new step (version) starts over from the cache: its first pass reads the cache, not the copy
    md = cpu_md(args, ranges, [37, 21], [5, 1], limit, version=8)
    cpu_forward(impl, md, q, k_new, v_new, cache)
    assert impl._step.key[0] == 8


def test_the_cpu_path_grows_its_copy_past_its_slack():
    """More draft passes than the copy's slack: the copy grows, keeping the step's rows."""
    from vllm_hivis.serving import draft_attention_cpu
    from vllm_hivis.serving.draft_attention import NO_LIMIT, HiViSDraftAttentionImpl

    gen = torch.Generator().manual_seed(4)
    _, _, _, ranges, args, kv = case(gen, torch.float32)
    impl = HiViSDraftAttentionImpl(4, 32, args["scale"], num_kv_heads=2)
    ref = kv.clone()
    lens = [37, 21]
    width = draft_attention_cpu.StepKV.width_for(37)
    for _ in range(width - 37 + 3):
        md = cpu_md(args, ranges, lens, [1, 1], [NO_LIMIT, NO_LIMIT], version=1)
        qd, kd, vd = (torch.randn(2, n, 32, generator=gen) for n in (4, 2, 2))
        got = cpu_forward(impl, md, qd, kd, vd, kv)
        for r in range(2):
            write_kv_ref(kd[r:r + 1], vd[r:r + 1], *kv_views(ref, 32), slots_at(args, ranges, r, [lens[r] - 1]))
        a = dict(args, seq_lens=torch.tensor(lens, dtype=torch.int32),
                 query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32))
        torch.testing.assert_close(got, tree_attention_ref(qd, *kv_views(ref, 32), **a, drop_ranges=ranges),
                                   atol=2e-5, rtol=2e-5)
        lens = [L + 1 for L in lens]
    assert impl._step.width > width


def test_mapped_slots_are_the_target_slots():
    """The write translation (kernels/kv_write.py mapped_slots, the torch form of write_kv_mapped):
    each new row at its target slot, -1 past its limit."""
    from vllm_hivis.kernels.kv_write import mapped_slots

    gen = torch.Generator().manual_seed(2)
    q, _, _, ranges, args, _ = case(gen, torch.float32)
    md = cpu_md(args, ranges, [37, 21], [5, 1], [60, 27], version=0)
    slots = mapped_slots(md.block_table, md.seq_lens, md.query_start_loc, md.ranges, md.limit, 16)
    assert slots[:5].tolist() == slots_at(args, ranges, 0, range(32, 37)).tolist()
    assert slots[5].item() == -1  # request 1's row (target position 28) is past its limit 27


@pytest.mark.parametrize("head_dim", [32, 128])
@pytest.mark.parametrize("q_lens", [[5, 1], [1, 1], [20, 3]])
def test_mapped_kv_write_kernel_matches_reference(head_dim, q_lens, device):
    """write_kv_mapped (the GPU path's drafter KV write: position map, slots and limits in one
    launch) == its torch reference, on caches laid out as vLLM hands them over (strided K / V
    halves), with several tiles per request (20 rows, BLOCK_T 16) and rows past their limit."""
    from vllm_hivis.kernels.kv_write import write_kv_mapped, write_kv_mapped_ref

    gen = torch.Generator().manual_seed(6)
    _, _, _, ranges, args, _ = case(gen, torch.float32)
    lens = [37, 21]
    md = cpu_md(args, ranges, lens, q_lens, [60, 27], version=0)
    T = sum(q_lens)
    k, v = (torch.randn(T, 2, head_dim, generator=gen) for _ in range(2))
    kv_a, *_ = vllm_layout_cache(24, 16, 2, head_dim, torch.float16, gen)
    kv_b = kv_a.clone().to(device)
    write_kv_mapped_ref(k, v, *kv_views(kv_a, head_dim), md.block_table, md.seq_lens, md.query_start_loc,
                        md.ranges, md.limit)
    to = lambda t: t.to(device)  # noqa: E731
    write_kv_mapped(to(k), to(v), *kv_views(kv_b, head_dim), to(md.block_table), to(md.seq_lens),
                    to(md.query_start_loc), to(md.ranges), to(md.limit), max_q_len=max(q_lens))
    torch.testing.assert_close(kv_b.cpu(), kv_a, equal_nan=True)
    assert (~torch.isnan(kv_a)).sum() > 0  # something was written (the reference wrote the rows within limits)


def test_the_cpu_path_carries_its_copy_to_the_next_step_only_when_it_may():
    """Steady decoding: the next step's first pass reuses the copy (same requests, same rows, same
    blocks) and still equals the reference; other requests, or a request whose blocks moved
    (preempted and resumed), rebuild it from the cache."""
    from vllm_hivis.serving.draft_attention import NO_LIMIT, HiViSDraftAttentionImpl

    gen = torch.Generator().manual_seed(5)
    _, _, _, ranges, args, kv = case(gen, torch.float32)
    impl = HiViSDraftAttentionImpl(4, 32, args["scale"], num_kv_heads=2)
    ref, limit = kv.clone(), [NO_LIMIT, NO_LIMIT]
    table = args["block_table"]

    def step(version, lens, q_lens, req_ids, drafts=3, block_table=table, cache=kv, ref=ref):
        a = dict(args, block_table=block_table)
        for n_rows, is_first in [(q_lens, True)] + [([1, 1], False)] * drafts:
            if not is_first:
                lens = [L + 1 for L in lens]
            md = cpu_md(a, ranges, lens, n_rows, limit, version, req_ids, block_table)
            T = sum(n_rows)
            q, k, v = (torch.randn(T, n, 32, generator=gen) for n in (4, 2, 2))
            got = cpu_forward(impl, md, q, k, v, cache)
            row = 0
            for r in range(2):
                for c in range(lens[r] - n_rows[r], lens[r]):
                    write_kv_ref(k[row:row + 1], v[row:row + 1], *kv_views(ref, 32),
                                 slots_at(a, ranges, r, [c]))
                    row += 1
            a["seq_lens"] = torch.tensor(lens, dtype=torch.int32)
            a["query_start_loc"] = torch.tensor([0, n_rows[0], T], dtype=torch.int32)
            want = tree_attention_ref(q, *kv_views(ref, 32), **a, drop_ranges=ranges)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        return impl._step

    ids = ("a", "b")
    first = step(1, [37, 21], [5, 1], ids)
    # all 4 drafts of request 0 accepted (its next window starts at the first draft row, 37), 1 of b's
    carried = step(2, [42, 23], [5, 2], ids)
    assert carried is first and carried.key[0] == 2  # carried over
    width = carried.width
    assert step(3, [47, 25], [5, 2], ids) is first
    wider = step(4, [52, 27], [5, 2], ids)  # past the copy's slack: carried into a wider copy
    assert wider is not first and wider.width > width and wider.req_ids == ids and wider.key[0] == 4
    assert step(5, [56, 29], [4, 2], ids) is wider  # carried again (fewer drafts accepted)
    other = step(6, [61, 31], [5, 2], ("a", "c"))  # row 1 holds another request: rebuilt
    assert other is not wider
    # the same ids with other images (a client reusing a request id): never carried over
    other_images = ranges.clone()
    other_images[1, 0] = torch.tensor([2, 6], dtype=torch.int32)
    # (DropRanges.ranges_version: ranges published since the copy read its own are compared)
    md = cpu_md(args, other_images, [66, 33], [5, 2], limit, 7, ("a", "c"), ranges_version=3)
    assert other.carry((7,), md, kv, np.array([5, 2]), ("a", "c")) is None
    assert other.carry((7,), cpu_md(args, ranges, [66, 33], [5, 2], limit, 7, ("a", "c"), ranges_version=3), kv,
                       np.array([5, 2]), ("a", "c")) is other  # the control: same images, carried
    assert other.ranges_version == 3  # from now on, version 3's ranges are known to equal the copy's
    # request a's block 1 moved to a free block whose contents differ (as after a preemption whose
    # recompute landed elsewhere): carrying the copy over would read the old keys
    free = sorted(set(range(24)) - set(table.flatten().tolist()))[0]
    moved = table.clone()
    moved[0, 1] = free
    kv_moved, ref_moved = kv.clone(), ref.clone()
    bump = torch.randn(kv[0].shape, generator=gen)
    for c_ in (kv_moved, ref_moved):
        c_[free] = c_[int(table[0, 1])] + bump
    rebuilt = step(7, [66, 33], [5, 2], ("a", "c"), block_table=moved, cache=kv_moved, ref=ref_moved)
    assert rebuilt is not other
