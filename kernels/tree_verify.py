"""Greedy verification of a draft token tree, and compaction of the accepted path's KV.

Vocabulary
----------
tree         per request ``num_nodes`` nodes in topological order. Node 0 is the root: the last
             verified token (its token is already known). ``parents[r, i]`` is the parent of node
             ``i``; ``parents[r, 0] = -1`` and ``parents[r, i] < i``. Nodes of smaller trees are
             padded with ``parents = -1`` (a padded node is nobody's child and is never reached).
draft token  ``draft_tokens[r, i]``: the token the drafter proposed for node ``i`` (root ignored).
target token ``target_argmax[r, i]``: the target model's greedy next token after node ``i``'s path.
accepted     child ``c`` of node ``n`` is accepted iff ``draft_tokens[c] == target_argmax[n]``.
             Starting from the root, the walk moves to the accepted child with the LOWEST index
             (deterministic) until a node has no accepted child or ``max_depth`` steps were taken.
accepted_len number of accepted draft tokens (the bonus token excluded).
bonus token  ``target_argmax`` at the last accepted node: always emitted, so a step yields
             ``accepted_len + 1`` tokens. Outputs are padded with -1 (vLLM's PLACEHOLDER_TOKEN_ID).
position     in the verification step node ``i`` was computed at logical position
             ``tree_start + i`` of its request (``tree_start`` = position of the root), so its K/V
             live in that position's slot. After acceptance the path must be a chain: the node
             accepted at depth ``k`` must live at position ``tree_start + k``.
slot         flat index ``block * block_size + offset`` into the cache viewed as
             ``[num_blocks * block_size, num_kv_heads, head_dim]``.

``compact_kv`` moves rows ``src_slots[r, k] -> dst_slots[r, k]`` in place (-1 in either = skip). It
is safe for any overlap of sources and destinations WITHIN a request: each program first reads all
source rows of its request into registers (a staging buffer), passes a barrier, then writes all
destinations. Contract: destinations are unique, and requests use disjoint slots.
"""


import torch
import triton
import triton.language as tl


@triton.jit
def _tree_verify_kernel(
    parents_ptr,  # [num_reqs, num_nodes] int32
    draft_tokens_ptr,  # [num_reqs, num_nodes] int64
    target_argmax_ptr,  # [num_reqs, num_nodes] int64
    accepted_len_ptr,  # [num_reqs] int32
    accepted_nodes_ptr,  # [num_reqs, max_depth + 1] int32, pre-filled with -1
    output_tokens_ptr,  # [num_reqs, max_depth + 1] int64, pre-filled with -1
    num_nodes, max_depth,
    NODES_PAD: tl.constexpr,
):
    req = tl.program_id(0)
    nodes = tl.arange(0, NODES_PAD)
    node_ok = nodes < num_nodes
    row = req.to(tl.int64) * num_nodes
    out_row = req.to(tl.int64) * (max_depth + 1)
    parents = tl.load(parents_ptr + row + nodes, mask=node_ok, other=-1)
    drafts = tl.load(draft_tokens_ptr + row + nodes, mask=node_ok, other=-1)

    cur = tl.zeros([], dtype=tl.int32)  # last accepted node (the root to start with)
    depth = tl.zeros([], dtype=tl.int32)  # accepted draft tokens so far
    tl.store(accepted_nodes_ptr + out_row, cur)
    for step in range(max_depth):
        target = tl.load(target_argmax_ptr + row + cur)
        # Once a step finds no child, every later step sees the same node and finds none either.
        accept = node_ok & (parents == cur) & (drafts == target)
        child = tl.min(tl.where(accept, nodes, NODES_PAD), axis=0)
        found = child < NODES_PAD
        tl.store(accepted_nodes_ptr + out_row + step + 1, child, mask=found)
        tl.store(output_tokens_ptr + out_row + step, target, mask=found)  # == drafts[child]
        cur = tl.where(found, child, cur)
        depth += found.to(tl.int32)
    bonus = tl.load(target_argmax_ptr + row + cur)
    tl.store(output_tokens_ptr + out_row + depth, bonus)
    tl.store(accepted_len_ptr + req, depth)


def _check_tree(parents, draft_tokens, target_argmax, max_depth):
    assert parents.dim() == 2 and parents.dtype == torch.int32, (
        f"parents must be int32 [num_reqs, num_nodes], got {parents.dtype} {tuple(parents.shape)}")
    for name, t in (("draft_tokens", draft_tokens), ("target_argmax", target_argmax)):
        assert t.shape == parents.shape and t.dtype == torch.int64, (
            f"{name} must be int64 {tuple(parents.shape)}, got {t.dtype} {tuple(t.shape)}")
    for name, t in (("parents", parents), ("draft_tokens", draft_tokens), ("target_argmax", target_argmax)):
        assert t.is_contiguous() and t.device == parents.device, f"{name} must be contiguous, on one device"
    assert parents.shape[1] >= 1, "every tree needs a root (num_nodes >= 1)"
    max_depth = parents.shape[1] - 1 if max_depth is None else max_depth
    assert max_depth >= 0, f"max_depth must be >= 0, got {max_depth}"
    return max_depth


def tree_verify(
    parents: torch.Tensor,  # [num_reqs, num_nodes] int32
    draft_tokens: torch.Tensor,  # [num_reqs, num_nodes] int64
    target_argmax: torch.Tensor,  # [num_reqs, num_nodes] int64
    max_depth: int | None = None,  # longest walk; default num_nodes - 1 (a chain)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree acceptance. Returns (accepted_len [num_reqs] int32,
    accepted_nodes [num_reqs, max_depth+1] int32, output_tokens [num_reqs, max_depth+1] int64)."""
    max_depth = _check_tree(parents, draft_tokens, target_argmax, max_depth)
    num_reqs, num_nodes = parents.shape
    dev = parents.device
    accepted_len = torch.zeros(num_reqs, dtype=torch.int32, device=dev)
    accepted_nodes = torch.full((num_reqs, max_depth + 1), -1, dtype=torch.int32, device=dev)
    output_tokens = torch.full((num_reqs, max_depth + 1), -1, dtype=torch.int64, device=dev)
    if num_reqs > 0:
        _tree_verify_kernel[(num_reqs,)](
            parents, draft_tokens, target_argmax, accepted_len, accepted_nodes, output_tokens,
            num_nodes, max_depth, NODES_PAD=triton.next_power_of_2(num_nodes))
    return accepted_len, accepted_nodes, output_tokens


def tree_verify_ref(
    parents: torch.Tensor,  # [num_reqs, num_nodes] int32
    draft_tokens: torch.Tensor,  # [num_reqs, num_nodes] int64
    target_argmax: torch.Tensor,  # [num_reqs, num_nodes] int64
    max_depth: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Python reference of ``tree_verify``: walk down the tree one accepted child at a time."""
    max_depth = _check_tree(parents, draft_tokens, target_argmax, max_depth)
    num_reqs, num_nodes = parents.shape
    accepted_len = torch.zeros(num_reqs, dtype=torch.int32)
    accepted_nodes = torch.full((num_reqs, max_depth + 1), -1, dtype=torch.int32)
    output_tokens = torch.full((num_reqs, max_depth + 1), -1, dtype=torch.int64)
    par, draft, target = parents.tolist(), draft_tokens.tolist(), target_argmax.tolist()
    for r in range(num_reqs):
        path, tokens = [0], []
        while len(tokens) < max_depth:
            cur = path[-1]
            children = [c for c in range(num_nodes) if par[r][c] == cur and draft[r][c] == target[r][cur]]
            if not children:
                break
            path.append(min(children))
            tokens.append(draft[r][path[-1]])
        tokens.append(target[r][path[-1]])  # the bonus token
        accepted_len[r] = len(path) - 1
        accepted_nodes[r, :len(path)] = torch.tensor(path, dtype=torch.int32)
        output_tokens[r, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    dev = parents.device
    return accepted_len.to(dev), accepted_nodes.to(dev), output_tokens.to(dev)


def accepted_path_slots(
    accepted_nodes: torch.Tensor,  # [num_reqs, max_depth + 1] int32, from tree_verify
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req] int32
    tree_start: torch.Tensor,  # [num_reqs] int, position of each root (node i was at tree_start + i)
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # src_slots, dst_slots: [num_reqs, max_depth] int64
    """Moves that turn the accepted path into a chain: the node accepted at depth k (1..max_depth)
    goes from position tree_start + node to tree_start + k. Nodes already in place get -1."""
    depth = torch.arange(1, accepted_nodes.shape[1], device=accepted_nodes.device)  # [max_depth]
    node = accepted_nodes[:, 1:].long()  # [num_reqs, max_depth]
    move = (node >= 0) & (node != depth)
    start = tree_start.long()[:, None]

    def slot(pos):  # [num_reqs, max_depth] logical positions -> flat slots
        pos = torch.where(move, pos, 0)
        return block_table.long().gather(1, pos // block_size) * block_size + pos % block_size

    src = torch.where(move, slot(start + node), -1)
    dst = torch.where(move, slot(start + depth), -1)
    return src, dst


@triton.jit
def _compact_kv_kernel(
    k_cache_ptr,  # [num_blocks * block_size, row_size] (the cache, contiguous)
    v_cache_ptr,  # [num_blocks * block_size, row_size]
    src_slots_ptr,  # [num_reqs, max_moves] int64, -1 = skip
    dst_slots_ptr,  # [num_reqs, max_moves] int64, -1 = skip
    max_moves, row_size,
    MOVES_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
):
    req = tl.program_id(0)
    feats = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # this program's columns of a row
    moves = tl.arange(0, MOVES_PAD)
    src = tl.load(src_slots_ptr + req * max_moves + moves, mask=moves < max_moves, other=-1)
    dst = tl.load(dst_slots_ptr + req * max_moves + moves, mask=moves < max_moves, other=-1)
    ok = ((src >= 0) & (dst >= 0))[:, None] & (feats < row_size)[None, :]
    src_offs = src[:, None] * row_size + feats[None, :]
    dst_offs = dst[:, None] * row_size + feats[None, :]
    k_rows = tl.load(k_cache_ptr + src_offs, mask=ok)  # staging: read every source first...
    v_rows = tl.load(v_cache_ptr + src_offs, mask=ok)
    tl.debug_barrier()  # ...all reads of the program are done before any write
    tl.store(k_cache_ptr + dst_offs, k_rows, mask=ok)
    tl.store(v_cache_ptr + dst_offs, v_rows, mask=ok)


def _check_compact(k_cache, v_cache, src_slots, dst_slots):
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype, (
        f"k_cache/v_cache must be [num_blocks, block_size, num_kv_heads, head_dim] of one shape and dtype, "
        f"got {tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "k_cache and v_cache must be contiguous"
    assert src_slots.dim() == 2 and src_slots.shape == dst_slots.shape, (
        f"src_slots/dst_slots must be [num_reqs, max_moves], got {tuple(src_slots.shape)}, {tuple(dst_slots.shape)}")
    assert src_slots.dtype == torch.int64 and dst_slots.dtype == torch.int64, "slots must be int64"
    assert src_slots.is_contiguous() and dst_slots.is_contiguous(), "slot tensors must be contiguous"


def compact_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], modified in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], modified in place
    src_slots: torch.Tensor,  # [num_reqs, max_moves] int64, -1 = skip
    dst_slots: torch.Tensor,  # [num_reqs, max_moves] int64, -1 = skip
) -> None:
    """Copy cache rows src -> dst for every request, in place (overlap-safe within a request)."""
    _check_compact(k_cache, v_cache, src_slots, dst_slots)
    num_reqs, max_moves = src_slots.shape
    row_size = k_cache.shape[2] * k_cache.shape[3]
    if num_reqs == 0 or max_moves == 0:
        return
    block_f = min(256, triton.next_power_of_2(row_size))
    _compact_kv_kernel[(num_reqs, triton.cdiv(row_size, block_f))](
        k_cache, v_cache, src_slots, dst_slots, max_moves, row_size,
        MOVES_PAD=triton.next_power_of_2(max_moves), BLOCK_F=block_f)


def compact_kv_ref(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], modified in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], modified in place
    src_slots: torch.Tensor,  # [num_reqs, max_moves] int64, -1 = skip
    dst_slots: torch.Tensor,  # [num_reqs, max_moves] int64, -1 = skip
) -> None:
    """Torch reference of ``compact_kv``: gather all sources (a copy), then scatter them."""
    _check_compact(k_cache, v_cache, src_slots, dst_slots)
    ok = (src_slots >= 0) & (dst_slots >= 0)
    src, dst = src_slots[ok], dst_slots[ok]
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, cache.shape[2], cache.shape[3])  # [num_blocks * block_size, heads, dim]
        flat[dst] = flat[src].clone()
