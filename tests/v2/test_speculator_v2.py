"""V2 speculator (serving/speculator_v2.py, on method/plan.py): the pure plan against brute-force
definitions, and the glue on CPU fakes.

The V2 runner cannot run here (Triton, CUDA). Its Triton kernels that the design leans on are
transcribed in numpy below (`emulate_prepare_prefill_inputs`, `FakeBlockTables`) from vLLM 0.32's
source; `test_v2_internals_*` hold the installed vLLM to the names, signatures and call order the
glue assumes, so a vLLM change fails here rather than on a GPU.
"""

import contextlib
import dataclasses
import inspect
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

from vllm_hivis.method import plan as P
from vllm_hivis.method.hide import as_spans
from vllm_hivis.serving import speculator_v2 as sv2
from vllm_hivis.serving.metrics import PrefillCounters

IMG = 7  # image placeholder id
JUNK = -5  # stale draft-buffer content: must never reach a row whose KV is read


# -- brute-force definitions --------------------------------------------------------------------


def kept_mask(spans, upto):
    """kept[p] for p < upto: row p is kept iff token p+1 is not an image placeholder."""
    image = np.zeros(upto + 1, dtype=bool)
    for off, n in spans:
        image[off:off + n] = True
    return ~image[1:upto + 1]


def drafter_pos(spans, p):
    """c(p) = number of kept rows before p."""
    return int(kept_mask(spans, p).sum()) if p else 0


def tokens(spans, length, rng):
    y = rng.integers(100, 1000, size=length)
    for off, n in spans:
        y[off:off + n] = IMG
    return y


def emulate_prepare_prefill_inputs(target_ids, qsl, num_rejected, next_token, stale):
    """numpy transcription of `_prepare_prefill_inputs_kernel` (target_dependent_ar/speculator.py:
    693-735): per request, the first q - n - 1 rows get the target ids shifted by one, row
    qs + q - n - 1 (the last token index) gets the next token; rejected rows keep stale ids."""
    draft = stale.copy()
    last = np.zeros(len(qsl) - 1, dtype=np.int64)
    for r in range(len(qsl) - 1):
        qs, ql = qsl[r], qsl[r + 1] - qsl[r] - num_rejected[r]
        draft[qs:qs + ql - 1] = target_ids[qs + 1:qs + ql]
        last[r] = qs + ql - 1
        draft[last[r]] = next_token[r]
    return draft, last


@dataclasses.dataclass
class Req:
    spans: list
    prompt_len: int
    s: int  # num_computed_tokens
    q: int  # scheduled rows
    n_rej: int = 0  # rejected drafts (decode rows)

    @property
    def drafts(self):
        return self.q - 1 if self.s >= self.prompt_len else 0


def make_batch(reqs, rng):
    """Target rows of a V2 batch: ids, positions, next tokens, and each request's true sequence y."""
    ys, ids, nxt = [], [], []
    for r in reqs:
        y = tokens(r.spans, r.s + r.q + 8, rng)
        w = y[r.s:r.s + r.q].copy()
        if r.n_rej:
            w[r.q - r.n_rej:] = y[r.s + r.q - r.n_rej:r.s + r.q] + 1000  # rejected drafts: wrong tokens
        ys.append(y)
        ids.append(w)
        nxt.append(y[r.s + r.q - r.n_rej])  # sampled token (decode / last chunk) or next prompt token
    qsl = np.concatenate([[0], np.cumsum([r.q for r in reqs])]).astype(np.int32)
    pos = np.concatenate([r.s + np.arange(r.q) for r in reqs])
    return ys, np.concatenate(ids), pos, np.array(nxt), qsl


# V2 batch order: verification rows first, then short extends and prefills (model_runner.py:2435)
MIXED = [
    Req([(5, 20)], 40, s=45, q=4, n_rej=2),  # decode after an image, 2 of 3 drafts rejected
    Req([(0, 10), (12, 8)], 30, s=33, q=4, n_rej=0),  # decode, two images, all accepted
    Req([(1, 3)], 30, s=30, q=4, n_rej=3),  # decode, all drafts rejected
    Req([], 12, s=0, q=12),  # text-only prompt, one shot
    Req([(4, 30)], 50, s=0, q=16),  # chunk ends inside the image (its last rows are dropped)
    Req([(4, 30)], 50, s=16, q=10),  # chunk wholly inside the image: one dummy row
    Req([(4, 30)], 50, s=26, q=24),  # last chunk: image tail dropped, text kept
    Req([(3, 5), (10, 4)], 20, s=0, q=20),  # two images, one shot
    Req([(2, 3), (5, 3)], 14, s=0, q=14),  # adjacent images
]


def plan_mixed(reqs=MIXED, seed=0):
    rng = np.random.default_rng(seed)
    ys, ids, pos, nxt, qsl = make_batch(reqs, rng)
    spans = [as_spans(r.spans) for r in reqs]
    plan = sv2.plan_v2_prefill(np.array([r.s for r in reqs]), qsl, spans, np.array([r.prompt_len for r in reqs]),
                               np.array([r.drafts for r in reqs]))
    return ys, ids, pos, nxt, qsl, plan


# -- the plan -------------------------------------------------------------------------------------


def test_mixed_batch_matches_brute_force():
    ys, ids, pos, nxt, qsl, plan = plan_mixed()
    n_rej = np.array([r.n_rej for r in MIXED])
    draft_ids, last = emulate_prepare_prefill_inputs(ids, qsl, n_rej, nxt, np.full(len(ids), JUNK))
    # compaction after the shift, as HiViSSpeculator._compact_prefill does it
    ids_c, pos_c = draft_ids[plan.keep_idx], pos[plan.keep_idx] - plan.offset
    last_c = P.last_token_indices(torch.from_numpy(plan.query_start_loc), torch.from_numpy(n_rej)).numpy()
    assert plan.dummy.tolist() == [False] * 5 + [True] + [False] * 3
    for r, req in enumerate(MIXED):
        lo, hi = plan.query_start_loc[r], plan.query_start_loc[r + 1]
        window = req.s + np.arange(req.q)
        kept = window[kept_mask(req.spans, req.s + req.q)[req.s:]]
        seq_c = req.s + req.q - plan.seq_shift[r]
        if plan.dummy[r]:
            assert len(kept) == 0 and plan.keep_idx[lo:hi].tolist() == [qsl[r + 1] - 1]
            assert pos_c[lo] == drafter_pos(req.spans, req.s + req.q)  # the next free drafter position
            assert seq_c == pos_c[lo] + 1 and last_c[r] == lo
            continue
        assert plan.keep_idx[lo:hi].tolist() == (qsl[r] + kept - req.s).tolist()
        assert pos_c[lo:hi].tolist() == [drafter_pos(req.spans, p) for p in kept]
        # the query is the last rows of a causal sequence of seq_c drafter positions
        assert seq_c == kept_mask(req.spans, req.s + req.q).sum()
        assert pos_c[lo:hi].tolist() == list(range(seq_c - (hi - lo), seq_c))
        # every accepted kept row reads x_{p+1}, even when row p+1 is dropped
        accepted = kept <= req.s + req.q - 1 - req.n_rej
        assert ids_c[lo:hi][accepted].tolist() == [ys[r][p + 1] for p in kept[accepted]]
        # last token: the last accepted kept row; it is V2's own last token row when that is kept
        assert last_c[r] == lo + accepted.sum() - 1
        if kept_mask(req.spans, last[r] - qsl[r] + req.s + 1)[-1]:
            assert plan.keep_idx[last_c[r]] == last[r]
        # first draft decode step (prepare_decode_inputs: seq_len - num_rejected + 1, position + 1)
        assert seq_c - req.n_rej + 1 == pos_c[last_c[r]] + 2


def test_identity_for_text_only_batch():
    reqs = [Req([], 10, s=12, q=4, n_rej=1), Req([], 9, s=0, q=9)]
    *_, plan = plan_mixed(reqs)
    assert plan.identity and plan.keep_idx.tolist() == list(range(13)) and not plan.seq_shift.any()


def test_padded_query_start_loc_is_trimmed():
    qsl = np.array([0, 4, 9, 9, 9], dtype=np.int32)  # 2 requests, padded to 4 for a FULL graph
    plan = sv2.plan_v2_prefill(np.array([30, 0]), qsl, [as_spans([(2, 3)]), as_spans([(1, 2)])])
    assert plan.query_start_loc.tolist() == [0, 4, 7]


def test_drafts_over_dropped_rows_violate_the_contract():
    with pytest.raises(AssertionError, match="dropped rows"):
        sv2.plan_v2_prefill(np.array([0]), np.array([0, 8]), [as_spans([(4, 10)])], num_draft_tokens=np.array([3]))


def run_request(spans, prompt_len, chunk, K, rng, steps=6):
    """One request through prefill chunks and decode steps with random rejections, tracking what
    each drafter KV position holds. Every position a kept draft reads must hold the right row."""
    y = tokens(spans, prompt_len + steps * (K + 1) + 4, rng)
    total = len(y) - 1
    kept_rows = np.nonzero(kept_mask(spans, total))[0]  # kept_rows[c] = target row at drafter position c
    kv: dict[int, int | None] = {}  # drafter position -> target row written there (None: junk)
    s, dummies = 0, 0
    while s < prompt_len + steps * (K + 1) and s + K + 1 < total:
        prefill = s < prompt_len
        q = min(chunk, prompt_len - s) if prefill else K + 1
        n = 0 if prefill else int(rng.integers(0, K + 1))
        w = y[s:s + q].copy()
        w[q - n:] += 1000  # rejected drafts
        plan = sv2.plan_v2_prefill(np.array([s]), np.array([0, q]), [as_spans(spans)],
                                   num_draft_tokens=None if prefill else np.array([K]))
        ids, _ = emulate_prepare_prefill_inputs(w, np.array([0, q]), np.array([n]), np.array([y[s + q - n]]),
                                                np.full(q, JUNK))
        keep = plan.keep_idx
        pos_c = s + keep - plan.offset
        assert (pos_c <= s + keep).all()  # c <= p: inside blocks the request already owns
        for i, k in enumerate(keep):
            p = s + k
            ok = not plan.dummy[0] and k <= q - 1 - n
            if ok:
                assert ids[k] == y[p + 1] and kept_rows[pos_c[i]] == p
            kv[int(pos_c[i])] = p if ok else None
        dummies += int(plan.dummy[0])
        c_s = int(pos_c[P.last_token_indices(torch.from_numpy(plan.query_start_loc),
                                                        torch.tensor([n]))[0]])
        seq_c = s + q - int(plan.seq_shift[0])
        assert seq_c - n == c_s + 1  # what prepare_decode_inputs builds on
        if not plan.dummy[0]:
            assert all(kv.get(c) == kept_rows[c] for c in range(c_s + 1)), f"stale drafter KV read at s={s}"
        for j in range(1, K):  # draft decode steps: position c_s + j, seq_len seq_c - n + j
            assert seq_c - n + j == c_s + j + 1
            kv[c_s + j] = None
        s += q - n
    return dummies


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 512])
@pytest.mark.parametrize("spans,prompt_len", [
    ([(4, 16)], 31), ([(3, 5), (10, 4)], 25), ([(1, 20)], 22), ([(0, 6)], 12), ([(2, 3), (5, 3)], 14),
    ([(5, 8)], 13),  # prompt ends with the image
])
def test_drafter_kv_lifecycle_over_chunks_and_rejections(spans, prompt_len, chunk, rng):
    dummies = run_request(spans, prompt_len, chunk, K=3, rng=rng)
    if chunk >= prompt_len:
        assert dummies == 0
    if chunk == 1:
        assert dummies == sum(n for _, n in spans) - sum(off == 0 for off, _ in spans)


# -- small pieces ---------------------------------------------------------------------------------


def test_compress_seq_lens_keeps_padding_and_dtype():
    seq = torch.tensor([50, 49, 12, 40, 0, 0], dtype=torch.int32)
    out = P.drafter_seq_lens(seq, np.array([20, 2, 0, 30]))
    assert out.dtype == torch.int32 and out.tolist() == [30, 47, 12, 10, 0, 0]
    assert seq.tolist() == [50, 49, 12, 40, 0, 0]  # the target's tensor is untouched


def test_request_spans_from_mm_features():
    f = lambda off, n: SimpleNamespace(mm_position=SimpleNamespace(offset=off, length=n))  # noqa: E731
    feats = {"a": [f(20, 4), f(2, 9)], "b": []}
    spans = [P.request_spans(feats.get(r)) for r in ["a", "b", "c"]]
    assert spans[0].tolist() == [[2, 9], [20, 4]] and spans[1].shape == (0, 2) and spans[2].shape == (0, 2)


def test_prefill_counters_over_chunks():
    c = PrefillCounters()
    sp = [as_spans([(4, 30)]), as_spans([])]
    for s, q in [(0, 16), (16, 10), (26, 24)]:
        qsl = np.array([0, q, q + 3])
        num_computed = np.array([s, s + 60])  # request "t" is decoding: no prompt rows
        plan = sv2.plan_v2_prefill(num_computed, qsl, sp, np.array([50, 60]))
        P.record_prefill(c, ["img", "t"], plan, num_computed, qsl, np.array([50, 60]))
        assert c.totals["requests"] == int(s + q >= 50)
    assert c.totals == {"drafter": 50 - 30, "target": 50, "requests": 1} and not c.pending


# -- glue on CPU fakes ----------------------------------------------------------------------------


class FakeBlockTables:
    """`BlockTables.compute_slot_mappings` (block_table.py:187-218, kernel 272-353): one KV group, no CP."""

    def __init__(self, table, block_size):
        self.table, self.bs = table, block_size
        self.slot_mappings = torch.full((1, 256), 123456, dtype=torch.int64)

    def compute_slot_mappings(self, idx_mapping, query_start_loc, positions, num_tokens_padded):
        out = self.slot_mappings
        n = int(query_start_loc[-1])
        out[0, n:] = -1
        for r in range(len(idx_mapping)):
            for t in range(int(query_start_loc[r]), int(query_start_loc[r + 1])):
                c = int(positions[t])
                out[0, t] = int(self.table[int(idx_mapping[r]), c // self.bs]) * self.bs + c % self.bs
        return out[:, :num_tokens_padded]


class FakeParent:
    """Stands in for TargetDependentARSpeculator: its buffers, and propose() in the parent's order
    (speculator.py:217-316): idx copy, prepare_prefill_inputs, hidden copy, _prefill, decode seq lens."""

    def __init__(self, vllm_config, device):
        from vllm.v1.worker.gpu.input_batch import InputBuffers

        self.speculative_config = vllm_config.speculative_config
        self.dp_size = self.dcp_size = 1
        self.num_speculative_steps = 3
        self.device = device
        self.input_buffers = InputBuffers(max_num_reqs=16, max_num_tokens=256, device=device)
        self.input_buffers.input_ids.fill_(JUNK)
        self.hidden_states = torch.zeros(256, 2)
        self.draft_tokens = torch.full((16, 3), 7, dtype=torch.int64)  # the parent's persistent draft buffer
        self.last_token_indices = torch.zeros(16, dtype=torch.int64)
        self.idx_mapping = torch.zeros(16, dtype=torch.int64)
        self.kv_cache_config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=["drafter.attn"])])
        self.pcp_manager = None
        self.begun = 0
        self.model = SimpleNamespace(begin_proposal=lambda: setattr(self, "begun", self.begun + 1))
        self.log = {}

    def _build_attn_metadata(self, **kw):
        self.log["attn_kwargs"] = kw
        return {"drafter.attn": "drafter-meta"}

    def propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states, num_sampled,
                num_rejected, last_sampled, next_prefill_tokens, temperature, seeds, dp_sync_state=None,
                dummy_run=False, skip_attn_for_dummy_run=False, mm_inputs=None, is_profile=False,
                num_speculative_tokens=None):
        from vllm.config.compilation import CUDAGraphMode

        B, ib = input_batch.num_reqs, self.input_buffers
        self.idx_mapping[:B] = input_batch.idx_mapping
        qsl = input_batch.query_start_loc.numpy()
        idx = input_batch.idx_mapping.numpy()
        nxt = np.where(num_sampled.numpy() > 0, last_sampled.numpy()[idx], next_prefill_tokens.numpy()[0, idx])
        ids, last = emulate_prepare_prefill_inputs(input_batch.input_ids.numpy(), qsl, num_rejected.numpy(), nxt,
                                                   ib.input_ids.numpy())
        ib.input_ids[: len(ids)] = torch.from_numpy(ids)
        for r in range(B):  # positions are copied for non-rejected rows only (speculator.py:726-730)
            a, b = qsl[r], qsl[r + 1] - int(num_rejected[r])
            ib.positions[a:b] = input_batch.positions[a:b]
        ib.query_start_loc[: B + 1] = input_batch.query_start_loc
        ib.seq_lens[:B] = input_batch.seq_lens[:B]
        self.last_token_indices[:B] = torch.from_numpy(last)
        self.hidden_states[: len(last_hidden_states)].copy_(last_hidden_states)
        self._prefill(B, input_batch.num_tokens_after_padding, attn_metadata, slot_mappings,
                      num_tokens_across_dp=None, cudagraph_runtime_mode=CUDAGraphMode.NONE, mm_inputs=mm_inputs)
        self.log["decode_seq_lens"] = input_batch.seq_lens[:B].clone()  # prepare_decode_inputs reads these
        return torch.zeros(B, 3, dtype=torch.int64)

    def _prefill(self, num_reqs, num_tokens, attn_metadata, slot_mappings, num_tokens_across_dp=None,
                 cudagraph_runtime_mode=None, mm_inputs=None):
        ib = self.input_buffers
        self.log["prefill"] = dict(
            num_tokens=num_tokens, attn=attn_metadata, slots=slot_mappings, mode=cudagraph_runtime_mode,
            ids=ib.input_ids[:num_tokens].clone(), pos=ib.positions[:num_tokens].clone(),
            hidden=self.hidden_states[:num_tokens].clone(), qsl=ib.query_start_loc.clone(),
            seq_lens=ib.seq_lens[:num_reqs].clone(), last=self.last_token_indices[:num_reqs].clone())


class FakeSpeculator(sv2.HiViSSpeculatorMixin, FakeParent):
    pass


def fake_batch(reqs, seed=0):
    """A real V2 InputBatch (make_dummy, then the fields the speculator reads) for `reqs`."""
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    rng = np.random.default_rng(seed)
    ys, ids, pos, nxt, qsl = make_batch(reqs, rng)
    B, N = len(reqs), len(ids)
    idx_np = rng.permutation(B + 2)[:B]
    batch = InputBatch.make_dummy(B, N, InputBuffers(16, 256, torch.device("cpu")))
    seq = np.array([r.s + r.q for r in reqs], dtype=np.int32)
    batch = dataclasses.replace(
        batch, req_ids=[f"r{i}" for i in range(B)], idx_mapping=torch.from_numpy(idx_np),
        idx_mapping_np=idx_np, num_scheduled_tokens=np.diff(qsl), query_start_loc=torch.from_numpy(qsl),
        query_start_loc_np=qsl, seq_lens=torch.from_numpy(seq), seq_lens_cpu_upper_bound=torch.from_numpy(seq.copy()),
        num_computed_tokens_np=np.array([r.s for r in reqs], dtype=np.int32),
        prefill_len_np=np.array([r.prompt_len for r in reqs], dtype=np.int32),
        is_prefilling_np=np.array([r.s < r.prompt_len for r in reqs]),
        num_draft_tokens_per_req=np.array([r.drafts for r in reqs], dtype=np.int32),
        input_ids=torch.from_numpy(ids.astype(np.int32)), positions=torch.from_numpy(pos.astype(np.int64)))
    last_sampled = torch.zeros(B + 2, dtype=torch.int64)
    last_sampled[idx_np] = torch.from_numpy(nxt)
    nxt_prefill = torch.zeros(1, B + 2, dtype=torch.int32)
    nxt_prefill[0, idx_np] = torch.from_numpy(nxt.astype(np.int32))
    num_sampled = torch.tensor([int(r.s + r.q >= r.prompt_len) for r in reqs], dtype=torch.int32)
    return ys, batch, last_sampled, nxt_prefill, num_sampled


def make_fake_speculator(reqs, batch, table, block_size):
    cfg = SimpleNamespace(speculative_config=SimpleNamespace(enable_adaptive_verification=False),
                          model_config=SimpleNamespace(uses_mrope=False), instance_id="fake-v2",
                          scheduler_config=SimpleNamespace(max_num_seqs=16))
    req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.zeros(16, dtype=np.int32)))
    req_states.prompt_len.np[batch.idx_mapping_np] = [r.prompt_len for r in reqs]
    spec = FakeSpeculator(cfg, torch.device("cpu"), req_states)
    f = lambda off, n: SimpleNamespace(mm_position=SimpleNamespace(offset=off, length=n))  # noqa: E731
    spec.model_state = SimpleNamespace(encoder_cache=SimpleNamespace(
        mm_features={rid: [f(*sp) for sp in r.spans] for rid, r in zip(batch.req_ids, reqs)}))
    spec.block_tables = FakeBlockTables(table, block_size)
    spec.prefill_counters.stats_dir = None
    return spec


def test_glue_propose_compacts_into_drafter_space():
    pytest.importorskip("vllm.v1.worker.gpu.input_batch")
    reqs, bs = MIXED, 4
    ys, batch, last_sampled, nxt_prefill, num_sampled = fake_batch(reqs)
    table = torch.arange(16 * 20, dtype=torch.int64).reshape(16, 20).flip(1)  # distinct blocks per state row
    spec = make_fake_speculator(reqs, batch, table, bs)
    B, N = batch.num_reqs, batch.num_tokens
    n_rej = torch.tensor([r.n_rej for r in reqs], dtype=torch.int32)
    hidden = torch.arange(N, dtype=torch.float32)[:, None].repeat(1, 2)
    out = spec.propose(batch, "target-meta", "target-slots", hidden, None, num_sampled, n_rej, last_sampled,
                       nxt_prefill, torch.zeros(16), torch.zeros(16, dtype=torch.int64))
    assert out.shape == (B, 3) and spec.begun == 1 and spec._hivis_step is None
    # the reference: the pure plan applied to the same batch
    plan = sv2.plan_v2_prefill(batch.num_computed_tokens_np, batch.query_start_loc_np,
                               [as_spans(r.spans) for r in reqs], None, batch.num_draft_tokens_per_req)
    M, keep = len(plan.keep_idx), plan.keep_idx
    pos_c = batch.positions.numpy()[keep] - plan.offset
    seq_c = np.array([r.s + r.q for r in reqs]) - plan.seq_shift
    log = spec.log["prefill"]
    assert log["num_tokens"] == M and log["attn"] == {"drafter.attn": "drafter-meta"}
    assert log["pos"].tolist() == pos_c.tolist()  # rejected rows too (from the target's positions)
    assert log["hidden"][:, 0].tolist() == keep.tolist()
    assert log["qsl"][: B + 1].tolist() == plan.query_start_loc.tolist() and (log["qsl"][B + 1:] == M).all()
    assert log["seq_lens"].tolist() == seq_c.tolist() and spec.log["decode_seq_lens"].tolist() == seq_c.tolist()
    assert log["last"].tolist() == (plan.query_start_loc[1:] - 1 - n_rej.numpy()).tolist()
    for r, req in enumerate(reqs):  # every accepted, non-dummy drafter row reads x_{p+1}
        rows = np.nonzero(plan.req_of_row == r)[0]
        for i in rows[: len(rows) - req.n_rej] if not plan.dummy[r] else []:
            p = batch.positions[keep[i]].item()
            assert log["ids"][i].item() == ys[r][p + 1]
    state = batch.idx_mapping_np[plan.req_of_row]
    expect = [table[st, c // bs].item() * bs + c % bs for st, c in zip(state, pos_c)]
    assert log["slots"]["drafter.attn"].tolist() == expect
    kw = spec.log["attn_kwargs"]
    assert kw["num_reqs"] == B and kw["step"] == 0 and kw["batch_desc"].num_tokens == M
    lo, hi = P.dropped_ranges([as_spans(r.spans) for r in reqs])  # published for the drafter's attention
    assert spec.drops.ranges[:B, : lo.shape[1], 0].tolist() == lo.tolist()
    assert spec.drops.ranges[:B, : lo.shape[1], 1].tolist() == hi.tolist()
    assert kw["query_start_loc_np"].tolist() == plan.query_start_loc.tolist()
    assert kw["seq_lens_cpu_upper_bound"][:B].tolist() == seq_c.tolist()
    assert batch.seq_lens.tolist() == [r.s + r.q for r in reqs]  # the runner's batch is untouched
    # prompt rows counted for the requests whose prompt this step finishes (rows over the prompt)
    done = [i for i, r in enumerate(reqs) if r.s < r.prompt_len <= r.s + r.q]
    assert spec.prefill_counters.totals["requests"] == len(done)


def test_glue_dummy_run_passes_through():
    pytest.importorskip("vllm.v1.worker.gpu.input_batch")
    reqs = MIXED[:4]
    ys, batch, last_sampled, nxt_prefill, num_sampled = fake_batch(reqs)
    spec = make_fake_speculator(reqs, batch, torch.zeros(16, 20, dtype=torch.int64), 4)
    spec.propose(batch, "target-meta", "target-slots", torch.zeros(batch.num_tokens, 2), None, num_sampled,
                 torch.zeros(4, dtype=torch.int32), last_sampled, nxt_prefill, torch.zeros(16),
                 torch.zeros(16, dtype=torch.int64), dummy_run=True)
    log = spec.log["prefill"]
    assert log["attn"] == "target-meta" and log["slots"] == "target-slots" and log["num_tokens"] == batch.num_tokens
    assert "attn_kwargs" not in spec.log and spec.begun == 1


def test_glue_forwards_skip_sample_of_vllm_0_33():
    """vLLM 0.33's _prefill takes skip_sample (True on steps whose drafts nobody uses): the hivis
    branch must pass it through, or every such step samples a draft for nothing."""
    pytest.importorskip("vllm.v1.worker.gpu.input_batch")

    class Parent033(FakeParent):
        def propose(self, *args, **kwargs):
            self._skip = True
            return super().propose(*args, **kwargs)

        def _prefill(self, num_reqs, num_tokens, attn_metadata, slot_mappings, num_tokens_across_dp=None,
                     cudagraph_runtime_mode=None, mm_inputs=None, skip_sample=False):
            self.log["skip_sample"] = skip_sample
            return super()._prefill(num_reqs, num_tokens, attn_metadata, slot_mappings, num_tokens_across_dp,
                                    cudagraph_runtime_mode, mm_inputs)

    class Spec033(sv2.HiViSSpeculatorMixin, Parent033):
        def _prefill(self, *args, **kwargs):  # what 0.33's propose() does on a skip-drafts step
            if getattr(self, "_skip", False) and "skip_sample" not in kwargs:
                kwargs["skip_sample"] = True
            return super()._prefill(*args, **kwargs)

    reqs = MIXED
    ys, batch, last_sampled, nxt_prefill, num_sampled = fake_batch(reqs)
    spec = make_fake_speculator(reqs, batch, torch.arange(16 * 20, dtype=torch.int64).reshape(16, 20), 4)
    spec.__class__ = Spec033
    spec.propose(batch, "target-meta", "target-slots", torch.zeros(batch.num_tokens, 2), None, num_sampled,
                 torch.tensor([r.n_rej for r in reqs], dtype=torch.int32), last_sampled, nxt_prefill,
                 torch.zeros(16), torch.zeros(16, dtype=torch.int64))
    assert spec.log["skip_sample"] is True and spec.log["prefill"]["attn"] == {"drafter.attn": "drafter-meta"}


def test_init_speculator_wrapper_picks_the_class(monkeypatch):
    calls = []

    def orig(vllm_config, device, req_states):
        calls.append((vllm_config, device, req_states))
        return "upstream"

    class Fake:
        def __init__(self, *args):
            self.args = args

    monkeypatch.setattr(sv2, "speculator_class", lambda: Fake)
    init = sv2.make_init_speculator(orig)
    assert init.__name__ == "orig" and init.__wrapped__ is orig

    def cfg(method, arch):
        draft = SimpleNamespace(architectures=[arch])
        return SimpleNamespace(speculative_config=SimpleNamespace(method=method, draft_model_config=draft))

    plain = cfg("eagle", "LlamaForCausalLMEagle")
    assert init(plain, "dev", "rs") == "upstream" and calls == [(plain, "dev", "rs")]
    hivis = cfg("eagle", "HiViSDrafterForCausalLM")
    made = init(hivis, "dev", "rs")
    assert isinstance(made, Fake) and made.args == (hivis, "dev", "rs") and len(calls) == 1


# -- the V2 internals the glue relies on (vLLM 0.32.0 as installed) ------------------------------


def _params(fn):
    return list(inspect.signature(fn).parameters)


def test_v2_internals_signatures():
    spec_mod = pytest.importorskip("vllm.v1.worker.gpu.spec_decode.speculator")
    from vllm.v1.worker.gpu import model_runner
    from vllm.v1.worker.gpu.block_table import BlockTables
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.spec_decode import init_speculator
    from vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator import TargetDependentARSpeculator

    assert _params(spec_mod.BaseSpeculator.propose) == _params(sv2.HiViSSpeculatorMixin.propose)
    # _prefill's positional order: the glue reads cudagraph_runtime_mode as args[1] after slot_mappings
    assert _params(TargetDependentARSpeculator._prefill) == [
        "self", "num_reqs", "num_tokens", "attn_metadata", "slot_mappings", "num_tokens_across_dp",
        "cudagraph_runtime_mode", "mm_inputs"]
    assert {"num_reqs", "batch_desc", "query_start_loc_np", "seq_lens_cpu_upper_bound", "step",
            "slot_mappings"} <= set(_params(spec_mod.DraftModelSpeculator._build_attn_metadata))
    assert _params(BlockTables.compute_slot_mappings)[:5] == [
        "self", "idx_mapping", "query_start_loc", "positions", "num_tokens_padded"]
    assert _params(init_speculator) == ["vllm_config", "device", "req_states"]
    # the module global patches/hivis.py replaces: the original, or our wrapper around it
    assert getattr(model_runner.init_speculator, "__wrapped__", model_runner.init_speculator) is init_speculator
    fields = {f.name for f in dataclasses.fields(InputBatch)}
    assert {"seq_lens", "seq_lens_cpu_upper_bound", "num_computed_tokens_np", "query_start_loc_np",
            "num_draft_tokens_per_req", "idx_mapping_np", "prefill_len_np", "positions", "req_ids"} <= fields
    cls = sv2.speculator_class()
    assert cls.__mro__[1] is sv2.HiViSSpeculatorMixin and issubclass(cls, spec_mod.DraftModelSpeculator)
    assert sv2.HiViSSpeculator is cls


def test_v2_internals_propose_call_order():
    mod = pytest.importorskip("vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator")
    src = inspect.getsource(mod.TargetDependentARSpeculator.propose)
    order = ["prepare_prefill_inputs(", "self.hidden_states[:num_tokens_padded].copy_(hidden_states)",
             "self.prefill_cudagraph_manager,", "self._prefill(", "prepare_decode_inputs("]
    at = [src.index(s) for s in order]
    assert at == sorted(at)
    # the decode seq lens and the metadata upper bound come from the batch the glue replaces
    decode_call = src[src.index("prepare_decode_inputs("):]
    assert decode_call.index("input_batch.seq_lens,") < decode_call.index(")")
    assert "input_batch.seq_lens_cpu_upper_bound," in src and "self.draft_max_seq_len" in src
    prefill_src = inspect.getsource(mod.TargetDependentARSpeculator._prefill)
    assert "self.last_token_indices[:num_reqs]" in prefill_src
    assert "self.input_buffers.positions[last_token_indices]" in prefill_src
    kernel_src = inspect.getsource(mod.prepare_prefill_inputs)
    assert "input_batch.seq_lens" in kernel_src and "input_batch.positions" in kernel_src


def test_glue_combines_a_multi_layer_drafters_auxiliary_layers():
    """A multi-layer drafter's auxiliary target layers (n x [N, H], V2 passes them beside the last
    hidden states) are combined by the drafter before anything else: the drafter rows then carry
    the combined features of their kept target rows, and vLLM's parent sees no aux list (its
    EagleSpeculator would assert method 'eagle3')."""
    pytest.importorskip("vllm.v1.worker.gpu.input_batch")
    reqs = MIXED
    ys, batch, last_sampled, nxt_prefill, num_sampled = fake_batch(reqs)
    spec = make_fake_speculator(reqs, batch, torch.zeros(16, 20, dtype=torch.int64), 4)
    seen = {}

    def combine(x):  # [N, 2*2] -> [N, 2]: a stand-in for feature_fc over two layers
        seen["aux"] = x.clone()
        return x[:, :2] * 10 + x[:, 2:]

    spec.model.combine_hidden_states = combine
    N = batch.num_tokens
    rows = torch.arange(N, dtype=torch.float32)[:, None]
    aux = [rows.repeat(1, 2), 100 + rows.repeat(1, 2)]
    spec.propose(batch, "target-meta", "target-slots", torch.full((N, 2), -1.0), aux, num_sampled,
                 torch.zeros(len(reqs), dtype=torch.int32), last_sampled, nxt_prefill, torch.zeros(16),
                 torch.zeros(16, dtype=torch.int64))
    assert seen["aux"].shape == (N, 4)
    plan = sv2.plan_v2_prefill(batch.num_computed_tokens_np, batch.query_start_loc_np,
                               [as_spans(r.spans) for r in reqs], None, batch.num_draft_tokens_per_req)
    keep = torch.from_numpy(plan.keep_idx).float()
    assert spec.log["prefill"]["hidden"][:, 0].tolist() == (keep * 10 + 100 + keep).tolist()


def test_glue_falls_back_to_exact_no_spec_drafts_when_drafting_raises(caplog):
    """A drafter fault on V2 (as on V1) costs one step's acceptance: token 0 drafts in the parent's
    persistent buffer, the step's state cleared, the error logged; the next proposal drafts again."""
    pytest.importorskip("vllm.v1.worker.gpu.input_batch")
    reqs = MIXED
    ys, batch, last_sampled, nxt_prefill, num_sampled = fake_batch(reqs)
    spec = make_fake_speculator(reqs, batch, torch.zeros(16, 20, dtype=torch.int64), 4)
    B = batch.num_reqs
    args = (batch, "target-meta", "target-slots", torch.zeros(batch.num_tokens, 2), None, num_sampled,
            torch.zeros(B, dtype=torch.int32), last_sampled, nxt_prefill, torch.zeros(16),
            torch.zeros(16, dtype=torch.int64))
    ok = FakeSpeculator._prefill

    def broken(self, *a, **k):
        raise RuntimeError("drafter exploded")

    FakeSpeculator._prefill = broken
    try:
        with caplog.at_level("ERROR", logger="vllm_hivis.speculator_v2"):
            out = spec.propose(*args)
    finally:
        FakeSpeculator._prefill = ok
    assert out.data_ptr() == spec.draft_tokens.data_ptr() and out.shape == (B, 3) and (out == 0).all()
    assert spec.failures == 1 and spec._hivis_step is None and "drafter exploded" in caplog.text
    spec.propose(*args)  # drafts again
    assert spec.failures == 1 and "prefill" in spec.log


@pytest.mark.parametrize("where", ["combine", "plan"])
def test_glue_falls_back_when_the_combine_or_the_plan_raises(where, caplog):
    """The protected region covers the multi-layer feature combine and the step's plan too, not
    only the drafting: a fault in either costs one step's acceptance (token 0 drafts), never the
    engine."""
    pytest.importorskip("vllm.v1.worker.gpu.input_batch")
    reqs = MIXED
    ys, batch, last_sampled, nxt_prefill, num_sampled = fake_batch(reqs)
    spec = make_fake_speculator(reqs, batch, torch.zeros(16, 20, dtype=torch.int64), 4)
    B, N = batch.num_reqs, batch.num_tokens

    def broken(*a, **k):
        raise RuntimeError(f"{where} exploded")

    aux = None
    if where == "combine":
        spec.model.combine_hidden_states = broken
        aux = [torch.zeros(N, 2), torch.zeros(N, 2)]
    with mock.patch.object(sv2, "plan_v2_prefill", broken) if where == "plan" else contextlib.nullcontext():
        with caplog.at_level("ERROR", logger="vllm_hivis.speculator_v2"):
            out = spec.propose(batch, "target-meta", "target-slots", torch.zeros(N, 2), aux, num_sampled,
                               torch.zeros(B, dtype=torch.int32), last_sampled, nxt_prefill, torch.zeros(16),
                               torch.zeros(16, dtype=torch.int64))
    assert out.shape == (B, 3) and (out == 0).all() and spec.failures == 1 and spec._hivis_step is None
    assert f"{where} exploded" in caplog.text
