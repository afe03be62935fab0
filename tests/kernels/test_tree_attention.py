"""Tests of kernels/tree_attention.py (paged tree attention) against torch and against itself.

Tiny shapes: on CPU the kernel runs under the Triton interpreter (see conftest.py).
"""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vllm_hivis.kernels.tree_attention import tree_attention, tree_attention_ref  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def random_parents(n, gen):
    """A random tree in topological order: parents[0] = -1, parents[i] < i."""
    return [-1][:n] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


def ancestor_mask(parents):
    """[n, n] bool, mask[i, j] = j is i or an ancestor of i."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def path_to(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def build(paged, qs, ks, vs, masks, block_size, gen, device):
    """Kernel arguments for requests with queries qs[r] [q_r, H, D], K/V ks[r], vs[r]
    [seq_len_r, KVH, D] (the last q_r rows being the new tokens) and masks[r] [q_r, q_r]."""
    k_cache, v_cache, block_table = paged.page_kv(ks, vs, block_size, gen)
    q_lens = [q.shape[0] for q in qs]
    cum = torch.tensor([0] + q_lens).cumsum(0)
    mask_cum = torch.tensor([0] + [m.numel() for m in masks]).cumsum(0)
    args = dict(
        q=torch.cat(qs), k_cache=k_cache, v_cache=v_cache, block_table=block_table,
        seq_lens=torch.tensor([k.shape[0] for k in ks], dtype=torch.int32),
        query_start_loc=cum.to(torch.int32),
        tree_mask=torch.cat([m.flatten() for m in masks]), mask_indptr=mask_cum.to(torch.int32),
        scale=qs[0].shape[-1] ** -0.5)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in args.items()}


def random_requests(q_lens, prefix_lens, num_heads, num_kv_heads, head_dim, dtype, gen):
    qs = [torch.randn(n, num_heads, head_dim, generator=gen).to(dtype) for n in q_lens]
    ks = [torch.randn(n + p, num_kv_heads, head_dim, generator=gen).to(dtype) for n, p in zip(q_lens, prefix_lens)]
    vs = [torch.randn(n + p, num_kv_heads, head_dim, generator=gen).to(dtype) for n, p in zip(q_lens, prefix_lens)]
    return qs, ks, vs


# (head_dim, block_size, num_heads, num_kv_heads, q_lens, prefix_lens)
CONFIGS = [
    (16, 4, 2, 2, [5], [0]),
    (16, 8, 4, 2, [3, 6, 1], [0, 9, 17]),
    (32, 16, 4, 4, [7, 0, 2], [20, 5, 0]),  # a request with no new tokens
    (32, 4, 2, 1, [4, 4, 4], [3, 0, 33]),
    (16, 16, 4, 2, [70], [40]),  # several query tiles and several KV tiles
]


@pytest.mark.parametrize("use_tree_mask", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_kernel_matches_reference(cfg, dtype, use_tree_mask, device, paged):
    head_dim, block_size, num_heads, num_kv_heads, q_lens, prefix_lens = cfg
    gen = torch.Generator().manual_seed(sum(q_lens) + head_dim + block_size)
    qs, ks, vs = random_requests(q_lens, prefix_lens, num_heads, num_kv_heads, head_dim, dtype, gen)
    masks = [ancestor_mask(random_parents(n, gen)) for n in q_lens]
    args = build(paged, qs, ks, vs, masks, block_size, gen, device)
    out = torch.full_like(args["q"], float("nan"))
    got = tree_attention(**args, use_tree_mask=use_tree_mask, out=out)
    want = tree_attention_ref(**args, use_tree_mask=use_tree_mask)
    assert got is out
    assert not want.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def sdpa_causal_new_tokens(q_new, k, v, scale, gen):
    """Causal SDPA over the full contiguous sequence; returns the rows of the last q_new tokens.
    The prefix positions get random queries so that is_causal is aligned over the whole sequence."""
    seq_len, q_len = k.shape[0], q_new.shape[0]
    q_prefix = torch.randn(seq_len - q_len, *q_new.shape[1:], generator=gen).to(q_new.dtype)
    q_full = torch.cat([q_prefix, q_new]).to(k.device)
    out = F.scaled_dot_product_attention(q_full.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                         v.transpose(0, 1).float(), is_causal=True, scale=scale,
                                         enable_gqa=True)
    return out.transpose(0, 1)[seq_len - q_len:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", CONFIGS[1:])
def test_chain_tree_equals_causal_and_sdpa(cfg, dtype, device, paged):
    head_dim, block_size, num_heads, num_kv_heads, q_lens, prefix_lens = cfg
    gen = torch.Generator().manual_seed(7 + sum(prefix_lens))
    qs, ks, vs = random_requests(q_lens, prefix_lens, num_heads, num_kv_heads, head_dim, dtype, gen)
    chains = [torch.ones(n, n, dtype=torch.bool).tril() for n in q_lens]  # parents[i] = i - 1
    args = build(paged, qs, ks, vs, chains, block_size, gen, device)
    with_mask = tree_attention(**args, use_tree_mask=True)
    causal = tree_attention(**{**args, "tree_mask": None, "mask_indptr": None}, use_tree_mask=False)
    torch.testing.assert_close(with_mask, causal, **TOL[dtype])
    sdpa = torch.cat([sdpa_causal_new_tokens(q, k, v, args["scale"], gen) for q, k, v in zip(qs, ks, vs)])
    torch.testing.assert_close(with_mask.float(), sdpa.to(device), **TOL[dtype])


BINARY_TREE = [-1, 0, 0, 1, 1, 2, 2]  # root, 2 children, 2 grandchildren each
DFS_TREE = [-1, 0, 1, 1, 0, 4, 4, 6]  # depth-first numbering, uneven depths


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2)])
@pytest.mark.parametrize("prefix_len", [0, 6])
@pytest.mark.parametrize("parents", [BINARY_TREE, DFS_TREE, "random"])
def test_tree_node_equals_causal_over_its_path(parents, prefix_len, num_heads, num_kv_heads, use_kernel, device, paged):
    """Each node's output == causal attention over prefix + the root-to-node path, run as a chain."""
    attend = tree_attention if use_kernel else tree_attention_ref
    gen = torch.Generator().manual_seed(prefix_len * 10 + num_heads)
    if parents == "random":
        parents = random_parents(9, gen)
    n, head_dim, block_size = len(parents), 16, 4
    (q,), (k,), (v,) = random_requests([n], [prefix_len], num_heads, num_kv_heads, head_dim, torch.float32, gen)
    tree_args = build(paged, [q], [k], [v], [ancestor_mask(parents)], block_size, gen, device)
    tree_out = attend(**tree_args)

    paths = [path_to(parents, i) for i in range(n)]  # one chain request per node
    new_rows = [prefix_len + torch.tensor(p) for p in paths]
    chain_args = build(paged, [q[p] for p in paths],
                       [torch.cat([k[:prefix_len], k[rows]]) for rows in new_rows],
                       [torch.cat([v[:prefix_len], v[rows]]) for rows in new_rows],
                       [torch.ones(len(p), len(p), dtype=torch.bool).tril() for p in paths],
                       block_size, gen, device)
    chain_out = attend(**chain_args)
    last_row_of_chain = chain_args["query_start_loc"][1:].long() - 1
    torch.testing.assert_close(tree_out, chain_out[last_row_of_chain], atol=1e-4, rtol=1e-4)
    # The mask matters: plain causal attention over the tree's token order differs somewhere.
    causal_out = attend(**tree_args, use_tree_mask=False)
    assert not torch.allclose(tree_out, causal_out, atol=1e-3)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_reference_matches_sdpa(num_heads, num_kv_heads, device, paged):
    gen = torch.Generator().manual_seed(num_heads * 3 + num_kv_heads)
    q_lens, prefix_lens = [4, 1, 6], [0, 5, 11]
    qs, ks, vs = random_requests(q_lens, prefix_lens, num_heads, num_kv_heads, 16, torch.float32, gen)
    chains = [torch.ones(n, n, dtype=torch.bool).tril() for n in q_lens]
    args = build(paged, qs, ks, vs, chains, 4, gen, device)
    sdpa = torch.cat([sdpa_causal_new_tokens(q, k, v, args["scale"], gen) for q, k, v in zip(qs, ks, vs)])
    for use_tree_mask in (True, False):
        ref = tree_attention_ref(**args, use_tree_mask=use_tree_mask)
        torch.testing.assert_close(ref, sdpa.to(device), atol=1e-5, rtol=1e-5)


def _valid_args(device, paged):
    gen = torch.Generator().manual_seed(0)
    qs, ks, vs = random_requests([3, 2], [4, 0], 4, 2, 16, torch.float32, gen)
    masks = [torch.ones(3, 3, dtype=torch.bool).tril(), torch.ones(2, 2, dtype=torch.bool).tril()]
    return build(paged, qs, ks, vs, masks, 4, gen, device)


BAD_INPUTS = {
    "q dtype": (lambda a: {**a, "q": a["q"].double()}, "dtype"),
    "cache dtype mismatch": (lambda a: {**a, "k_cache": a["k_cache"].half()}, "share a dtype"),
    "q not contiguous": (lambda a: {**a, "q": a["q"].transpose(1, 2).contiguous().transpose(1, 2)}, "contiguous"),
    "q not 3-D": (lambda a: {**a, "q": a["q"].flatten(1)}, r"\[num_q_tokens, num_heads, head_dim\]"),
    "k/v shape mismatch": (lambda a: {**a, "v_cache": a["v_cache"][:-1].contiguous()}, "v_cache"),
    "head_dim mismatch": (lambda a: {**a, "q": a["q"][..., :8].contiguous()}, "head_dim"),
    "heads not multiple": (lambda a: {**a, "q": a["q"][:, :3].contiguous()}, "multiple"),
    "block_table int64": (lambda a: {**a, "block_table": a["block_table"].long()}, "block_table"),
    "seq_lens shape": (lambda a: {**a, "seq_lens": a["seq_lens"][:1]}, "seq_lens"),
    "query_start_loc shape": (lambda a: {**a, "query_start_loc": a["query_start_loc"][:-1]}, "query_start_loc"),
    "missing tree_mask": (lambda a: {**a, "tree_mask": None}, "tree_mask"),
    "tree_mask dtype": (lambda a: {**a, "tree_mask": a["tree_mask"].float()}, "tree_mask"),
}


@pytest.mark.parametrize("attend", [tree_attention, tree_attention_ref], ids=["kernel", "reference"])
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_input_validation(case, attend, device, paged):
    valid = _valid_args(device, paged)
    attend(**valid)  # the unmodified arguments are accepted
    corrupt, message = BAD_INPUTS[case]
    with pytest.raises((AssertionError, ValueError), match=message):
        attend(**corrupt(valid))
