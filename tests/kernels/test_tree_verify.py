"""Tests of kernels/tree_verify.py: greedy tree acceptance and accepted-path KV compaction."""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from vllm_hivis.kernels.tree_attention import tree_attention  # noqa: E402
from vllm_hivis.kernels.tree_verify import accepted_path_slots, compact_kv, compact_kv_ref, tree_verify, tree_verify_ref  # noqa: E402


def random_forest(num_reqs, num_nodes, vocab, gen):
    """Random trees (sizes 1..num_nodes, padded with parents = -1; the parent of node i is drawn from
    i//2 .. i-1) and random tokens."""
    parents = torch.full((num_reqs, num_nodes), -1, dtype=torch.int32)
    for r in range(num_reqs):
        size = int(torch.randint(1, num_nodes + 1, (1,), generator=gen))
        for i in range(1, size):
            parents[r, i] = int(torch.randint(i // 2, i, (1,), generator=gen))  # deepish trees
    draft = torch.randint(0, vocab, (num_reqs, num_nodes), generator=gen)
    target = torch.randint(0, vocab, (num_reqs, num_nodes), generator=gen)
    return parents, draft, target


def assert_same(got, want):
    for name, g, w in zip(("accepted_len", "accepted_nodes", "output_tokens"), got, want):
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w.cpu()), f"{name}: {g} != {w}"


@pytest.mark.parametrize("max_depth", [None, 2])
@pytest.mark.parametrize("seed", range(4))
def test_kernel_matches_reference_on_random_trees(seed, max_depth, device):
    gen = torch.Generator().manual_seed(seed)
    parents, draft, target = random_forest(10, 11, vocab=2, gen=gen)  # vocab 2: many acceptances, ties
    got = tree_verify(parents.to(device), draft.to(device), target.to(device), max_depth)
    want = tree_verify_ref(parents, draft, target, max_depth)
    assert_same(got, want)
    assert int(want[0].max()) >= 2, "the random trees should accept more than one token somewhere"


def chain_greedy(drafts, targets):
    """vLLM-style chain greedy check: drafts d_1..d_K, targets t_0..t_K (t_i follows d_i)."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted, drafts[:accepted] + [targets[accepted]]


@pytest.mark.parametrize("seed", range(3))
def test_chain_tree_equals_longest_prefix_match(seed, device):
    gen = torch.Generator().manual_seed(100 + seed)
    num_reqs, k = 8, 5
    parents = (torch.arange(k + 1, dtype=torch.int32) - 1).repeat(num_reqs, 1)  # 0 <- 1 <- 2 ...
    target = torch.randint(0, 3, (num_reqs, k + 1), generator=gen)
    # Draft = target of the previous node, corrupted at random places: every accepted_len occurs.
    draft = torch.cat([torch.zeros(num_reqs, 1, dtype=torch.long), target[:, :-1]], dim=1)
    corrupt = torch.rand(num_reqs, k + 1, generator=gen) < 0.25
    draft = torch.where(corrupt, draft + 1, draft)
    for verify in (tree_verify, tree_verify_ref):
        acc_len, acc_nodes, out = verify(parents.to(device), draft.to(device), target.to(device))
        for r in range(num_reqs):
            n, tokens = chain_greedy(draft[r, 1:].tolist(), target[r].tolist())
            assert int(acc_len[r]) == n
            assert acc_nodes[r].tolist() == list(range(n + 1)) + [-1] * (k - n)
            assert out[r].tolist() == tokens + [-1] * (k - n)


def depth_of(parents, i):
    return 0 if parents[i] < 0 else 1 + depth_of(parents, parents[i])


@pytest.mark.parametrize("seed", range(3))
def test_agreement_along_deepest_path_accepts_all_of_it(seed, device):
    gen = torch.Generator().manual_seed(200 + seed)
    parents, _, _ = random_forest(1, 12, vocab=1, gen=gen)
    par = parents[0].tolist()
    draft = torch.arange(100, 112).view(1, -1)  # distinct tokens
    target = torch.full_like(draft, -7)  # -7 is no draft token: off-path nodes accept nothing
    leaf = max(range(12), key=lambda i: depth_of(par, i))
    path = [leaf]
    while par[path[0]] >= 0:
        path.insert(0, par[path[0]])
    for node, child in zip(path, path[1:]):
        target[0, node] = draft[0, child]
    target[0, leaf] = 42
    acc_len, acc_nodes, out = tree_verify(parents.to(device), draft.to(device), target.to(device))
    depth = len(path) - 1
    assert int(acc_len[0]) == depth == depth_of(par, leaf)
    assert acc_nodes[0, :depth + 1].tolist() == path and (acc_nodes[0, depth + 1:] == -1).all()
    assert out[0, :depth + 1].tolist() == draft[0, path[1:]].tolist() + [42]


def test_equal_siblings_lowest_index_wins(device):
    """Every draft matches its parent's target, but the walk takes the LOWEST-index child (a leaf
    here), not the longest path: node 1 is accepted, nodes 2 -> 3 are not."""
    parents = torch.tensor([[-1, 0, 0, 2]], dtype=torch.int32)
    draft = torch.tensor([[0, 5, 5, 5]])
    target = torch.tensor([[5, 8, 5, 9]])
    for verify in (tree_verify, tree_verify_ref):
        acc_len, acc_nodes, out = verify(parents.to(device), draft.to(device), target.to(device))
        assert acc_len.tolist() == [1]
        assert acc_nodes.tolist() == [[0, 1, -1, -1]]
        assert out.tolist() == [[5, 8, -1, -1]]


def test_no_match_emits_only_the_bonus(device):
    gen = torch.Generator().manual_seed(3)
    parents, draft, _ = random_forest(4, 7, vocab=5, gen=gen)
    target = torch.randint(10, 20, draft.shape, generator=gen)  # disjoint from the drafts
    acc_len, acc_nodes, out = tree_verify(parents.to(device), draft.to(device), target.to(device))
    assert acc_len.tolist() == [0] * 4
    assert (acc_nodes[:, 0] == 0).all() and (acc_nodes[:, 1:] == -1).all()
    assert torch.equal(out[:, 0].cpu(), target[:, 0]) and (out[:, 1:] == -1).all()


def test_max_depth_truncates_the_walk(device):
    parents = torch.tensor([[-1, 0, 1, 2, 3]], dtype=torch.int32)
    target = torch.tensor([[11, 12, 13, 14, 15]])
    draft = torch.tensor([[0, 11, 12, 13, 14]])  # the whole chain matches
    acc_len, acc_nodes, out = tree_verify(parents.to(device), draft.to(device), target.to(device))
    assert acc_len.tolist() == [4] and out.tolist() == [[11, 12, 13, 14, 15]]
    acc_len, acc_nodes, out = tree_verify(parents.to(device), draft.to(device), target.to(device), max_depth=2)
    assert acc_len.tolist() == [2] and acc_nodes.tolist() == [[0, 1, 2]] and out.tolist() == [[11, 12, 13]]


@pytest.mark.parametrize("bad,message", [
    (dict(parents=torch.zeros(2, 4, dtype=torch.int64)), "parents"),
    (dict(draft_tokens=torch.zeros(2, 4, dtype=torch.int32)), "draft_tokens"),
    (dict(target_argmax=torch.zeros(2, 5, dtype=torch.int64)), "target_argmax"),
    (dict(draft_tokens=torch.zeros(4, 2, dtype=torch.int64).t()), "contiguous"),
])
def test_verify_input_validation(bad, message, device):
    args = dict(parents=torch.tensor([[-1, 0, 0, 1]] * 2, dtype=torch.int32),
                draft_tokens=torch.zeros(2, 4, dtype=torch.int64), target_argmax=torch.zeros(2, 4, dtype=torch.int64))
    args = {k: v.to(device) for k, v in {**args, **bad}.items()}
    for verify in (tree_verify, tree_verify_ref):
        with pytest.raises(AssertionError, match=message):
            verify(**args)


def random_cache(num_blocks, block_size, dtype, gen):
    return [torch.randn(num_blocks, block_size, 2, 8, generator=gen).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_kv_matches_reference_and_snapshot(dtype, device):
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = random_cache(6, 4, dtype, gen)  # 24 slots; request r owns slots 8r .. 8r+7
    src = torch.full((3, 5), -1, dtype=torch.long)
    dst = torch.full((3, 5), -1, dtype=torch.long)
    for r in range(3):
        slots = 8 * r + torch.randperm(8, generator=gen)
        moves = int(torch.randint(1, 6, (1,), generator=gen))
        dst[r, :moves] = slots[:moves]  # unique destinations
        src[r, :moves] = 8 * r + torch.randint(0, 8, (moves,), generator=gen)  # may hit destinations
    src[1, 0] = -1  # a skipped move
    expect_k, expect_v = k_cache.clone().view(24, 2, 8), v_cache.clone().view(24, 2, 8)
    ok = (src >= 0) & (dst >= 0)
    expect_k[dst[ok]], expect_v[dst[ok]] = k_cache.view(24, 2, 8)[src[ok]], v_cache.view(24, 2, 8)[src[ok]]
    kr, vr = k_cache.clone(), v_cache.clone()
    compact_kv_ref(kr, vr, src, dst)
    kk, vk = k_cache.to(device), v_cache.to(device)
    compact_kv(kk, vk, src.to(device), dst.to(device))
    for got in (kr, kk.cpu()):
        assert torch.equal(got.view(24, 2, 8), expect_k)
    for got in (vr, vk.cpu()):
        assert torch.equal(got.view(24, 2, 8), expect_v)


@pytest.mark.parametrize("src_row,dst_row", [([2, 5, 6], [1, 2, 3]),  # move 1 lands on move 0's source
                                             ([1, 2], [2, 1])])  # a swap: no sequential order works
def test_compact_kv_overlapping_moves(src_row, dst_row, device):
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache = random_cache(2, 4, torch.float32, gen)
    old_k, old_v = k_cache.view(8, 2, 8).clone(), v_cache.view(8, 2, 8).clone()
    for compact in (compact_kv, compact_kv_ref):
        kc, vc = k_cache.clone().to(device), v_cache.clone().to(device)
        compact(kc, vc, torch.tensor([src_row]).to(device), torch.tensor([dst_row]).to(device))
        kc, vc = kc.view(8, 2, 8).cpu(), vc.view(8, 2, 8).cpu()
        assert torch.equal(kc[dst_row], old_k[src_row]) and torch.equal(vc[dst_row], old_v[src_row])
        untouched = [s for s in range(8) if s not in dst_row]
        assert torch.equal(kc[untouched], old_k[untouched]) and torch.equal(vc[untouched], old_v[untouched])


# Trees whose accepted path is 0 -> 2 -> 3 -> 4 (overlapping moves 2->1, 3->2, 4->3) and 0 -> 4 -> 6 -> 7.
PATH_CASES = [([-1, 0, 0, 2, 3, 1], [0, 2, 3, 4]), ([-1, 0, 1, 1, 0, 4, 4, 6], [0, 4, 6, 7])]


@pytest.mark.parametrize("prefix_len", [0, 5])
@pytest.mark.parametrize("parents,path", PATH_CASES)
def test_accepted_path_reads_as_a_chain_after_compaction(parents, path, prefix_len, device, paged):
    """verify -> accepted_path_slots -> compact_kv: the path's K/V sit at consecutive positions, and
    causal attention over that chain reproduces the tree attention outputs of the path nodes."""
    gen = torch.Generator().manual_seed(len(parents) + prefix_len)
    n, heads, kv_heads, head_dim, block_size = len(parents), 4, 2, 16, 4
    draft = torch.arange(50, 50 + n).view(1, n)
    target = torch.full_like(draft, -1)
    for node, child in zip(path, path[1:]):
        target[0, node] = draft[0, child]
    target[0, path[-1]] = 7
    acc_len, acc_nodes, out = tree_verify(torch.tensor([parents], dtype=torch.int32).to(device),
                                          draft.to(device), target.to(device))
    assert acc_len.tolist() == [len(path) - 1] and acc_nodes[0, :len(path)].tolist() == path
    assert out[0, :len(path)].tolist() == draft[0, path[1:]].tolist() + [7]

    q = torch.randn(n, heads, head_dim, generator=gen)
    k, v = (torch.randn(prefix_len + n, kv_heads, head_dim, generator=gen) for _ in range(2))
    k_cache, v_cache, block_table = (t.to(device) for t in paged.page_kv([k], [v], block_size, gen))

    def attend(queries, seq_len, mask):  # one request: its new tokens are the last len(queries)
        i32 = dict(dtype=torch.int32, device=device)
        return tree_attention(
            queries.to(device), k_cache, v_cache, block_table, torch.tensor([seq_len], **i32),
            torch.tensor([0, len(queries)], **i32), None if mask is None else mask.flatten().to(device),
            None if mask is None else torch.tensor([0, mask.numel()], **i32), head_dim ** -0.5,
            use_tree_mask=mask is not None)

    tree_mask = torch.tensor([[b == a or b in path_ancestors(parents, a) for b in range(n)] for a in range(n)])
    tree_out = attend(q, prefix_len + n, tree_mask)

    src, dst = accepted_path_slots(acc_nodes, block_table, torch.tensor([prefix_len], device=device), block_size)
    compact_kv(k_cache, v_cache, src, dst)
    chain_pos = torch.arange(prefix_len + len(path))
    expect_rows = torch.cat([torch.arange(prefix_len), prefix_len + torch.tensor(path)])
    assert torch.equal(paged.read_paged(k_cache, block_table, 0, chain_pos).cpu(), k[expect_rows])
    assert torch.equal(paged.read_paged(v_cache, block_table, 0, chain_pos).cpu(), v[expect_rows])
    chain_out = attend(q[path], prefix_len + len(path), None)  # causal over the compacted chain
    torch.testing.assert_close(chain_out, tree_out[path], atol=1e-4, rtol=1e-4)


def test_accepted_path_slots_moves_only_misplaced_nodes(device):
    block_table = torch.tensor([[3, 0, 2], [1, 4, 5]], dtype=torch.int32)  # block_size 2
    accepted_nodes = torch.tensor([[0, 1, 3, 4], [0, 2, -1, -1]], dtype=torch.int32)
    tree_start = torch.tensor([1, 0])  # request 0: node i at position 1 + i; request 1: at i

    def slot(r, pos):
        return int(block_table[r, pos // 2]) * 2 + pos % 2

    src, dst = accepted_path_slots(accepted_nodes.to(device), block_table.to(device), tree_start.to(device), 2)
    assert src.dtype == dst.dtype == torch.int64
    assert src.tolist() == [[-1, slot(0, 4), slot(0, 5)], [slot(1, 2), -1, -1]]
    assert dst.tolist() == [[-1, slot(0, 3), slot(0, 4)], [slot(1, 1), -1, -1]]


def path_ancestors(parents, i):
    out = []
    while parents[i] >= 0:
        i = parents[i]
        out.append(i)
    return out
