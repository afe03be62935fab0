"""The drop rule (method/hide.py) and the step plan (method/plan.py): kept rows, drafter positions,
chunked windows, dummy rows, and the worked examples of plan.py's docstrings."""

import numpy as np
import pytest

from vllm_hivis.method.hide import as_spans, dropped_before, is_dropped, kept_rows
from vllm_hivis.method.plan import plan_step


def brute_force(spans, length):
    """Definition, spelled out: drop row p iff token p+1 is an image placeholder."""
    image = set()
    for off, n in spans:
        image.update(range(off, off + n))
    kept = [p for p in range(length) if p + 1 not in image]
    return kept, {p: i for i, p in enumerate(kept)}


@pytest.mark.parametrize("spans,length", [
    ([], 10),
    ([(4, 16)], 31),  # image after a short text head
    ([(1, 81)], 94),  # image right after BOS
    ([(3, 5), (10, 4)], 25),  # two images
    ([(24, 16)], 43),  # image near the end
    ([(0, 6)], 12),  # image at position 0 (no row before it)
])
def test_kept_rows_match_definition(spans, length):
    sp = as_spans(spans)
    kept, c_of = brute_force(spans, length)
    assert kept_rows(sp, length).tolist() == kept
    p = np.arange(length)
    # c(p) = p - |J ∩ [0,p)| equals the index of p among kept rows
    c = p - dropped_before(sp, p)
    assert [int(c[q]) for q in kept] == list(range(len(kept)))
    assert is_dropped(sp, p).sum() == length - len(kept)


def test_text_token_count():
    # prompt of 94 tokens, 81 image placeholders at offset 4: the drafter's prompt rows are the
    # rows whose next token is text, p+1 in [1, 94] minus the image: 94 - 81 = 13 text tokens
    # (BOS is never an input; the first sampled token is).
    sp = as_spans([(4, 81)])
    plan = plan_step(np.array([0]), np.array([0, 94]), [sp], prompt_lens=np.array([94]))
    assert plan.drafter_prompt_rows.tolist() == [13]
    assert plan.target_prompt_rows.tolist() == [94]


def run_chunks(spans, length, chunk):
    """Feed a request through windows of `chunk` rows; return (positions seen, seq lens, dummies)."""
    sp = as_spans(spans)
    seen, seq_lens, dummies = [], [], 0
    for s in range(0, length, chunk):
        q = min(chunk, length - s)
        plan = plan_step(np.array([s]), np.array([0, q]), [sp])
        rows = plan.keep_idx
        p = s + rows
        c = p - plan.offset
        assert plan.positions.tolist() == c.tolist()
        if plan.dummy[0]:
            dummies += 1
            assert len(rows) == 1 and rows[0] == q - 1
        else:
            seen += list(zip(p.tolist(), c.tolist()))
        seq_lens.append(s + q - int(plan.seq_shift[0]))
        assert seq_lens[-1] == int(c[-1]) + 1
    return seen, seq_lens, dummies


@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 16, 32, 512])
@pytest.mark.parametrize("spans,length", [([(4, 16)], 31), ([(3, 5), (10, 4)], 25), ([(1, 20)], 22)])
def test_chunked_windows_equal_one_shot(spans, length, chunk):
    kept, c_of = brute_force(spans, length)
    seen, seq_lens, dummies = run_chunks(spans, length, chunk)
    assert [p for p, _ in seen] == kept
    assert all(c == c_of[p] for p, c in seen)
    assert seq_lens[-1] == len(kept)
    if chunk >= length:
        assert dummies == 0


def test_dummy_row_sits_at_next_free_position():
    # window [5, 10) lies wholly inside the image [4, 20): rows 5..9 all have image next tokens
    sp = as_spans([(4, 16)])
    plan = plan_step(np.array([5]), np.array([0, 5]), [sp])
    assert plan.dummy.tolist() == [True]
    c_dummy = 9 - plan.offset[0]
    # kept rows before position 10: rows 0,1,2 (next tokens 1,2,3 are text) -> next free c = 3
    assert c_dummy == 3
    assert 10 - plan.seq_shift[0] == 4


def test_batch_mixed_and_identity():
    img = as_spans([(4, 16)])
    # request 0: full prompt (image), request 1: text-only prefill, request 2: decode after image
    plan = plan_step(np.array([0, 0, 40]), np.array([0, 31, 42, 45]), [img, as_spans([]), img])
    assert not plan.identity
    q = np.diff(plan.query_start_loc)
    assert q.tolist() == [31 - 16, 11, 3]
    # decode rows of request 2 shift by all 16 dropped rows
    assert plan.offset[plan.req_of_row == 2].tolist() == [16, 16, 16]
    assert plan.seq_shift.tolist() == [16, 0, 16]
    text_only = plan_step(np.array([0, 5]), np.array([0, 4, 6]), [as_spans([]), as_spans([])])
    assert text_only.identity and text_only.keep_idx.tolist() == list(range(6))


def test_generated_image_token_ids_are_text():
    # spans, not token ids, decide: rows after the prompt are never dropped
    sp = as_spans([(2, 3)])
    plan = plan_step(np.array([10]), np.array([0, 4]), [sp])
    assert plan.keep_idx.tolist() == [0, 1, 2, 3]


def test_worked_examples_of_the_docstrings():
    """The E.g. blocks of plan_step, target_positions, compacted_sample_rows and last_token_indices."""
    import torch

    from vllm_hivis.method.plan import compacted_sample_rows, last_token_indices, target_positions

    img = as_spans([(2, 3)])
    plan = plan_step(np.array([0, 7]), np.array([0, 7, 10]), [img, img])
    assert plan.keep_idx.tolist() == [0, 4, 5, 6, 7, 8, 9]
    assert plan.offset.tolist() == [0, 3, 3, 3, 3, 3, 3]
    assert (np.array([0, 4, 5, 6, 7, 8, 9]) - plan.offset).tolist() == plan.positions.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert plan.req_of_row.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert plan.query_start_loc.tolist() == [0, 4, 7] and plan.seq_shift.tolist() == [3, 3]
    assert target_positions(torch.tensor([0, 1, 2, 3]), torch.tensor([[1, 4], [6, 8]])).tolist() == [0, 4, 5, 8]
    tis = compacted_sample_rows(torch.tensor([6, 9]), torch.tensor([0, 7, 10]), torch.from_numpy(plan.query_start_loc))
    assert tis.tolist() == [3, 6]
    assert last_token_indices(torch.tensor([0, 4, 7]), torch.tensor([0, 1])).tolist() == [3, 5]


def plan_step_loop(num_computed, query_start_loc, spans, prompt_lens=None):
    """The original per-request implementation of plan_step (a reference for the vectorized one)."""
    from vllm_hivis.method.hide import dropped_before, is_dropped
    from vllm_hivis.method.plan import StepPlan

    B = len(num_computed)
    assert query_start_loc.shape == (B + 1,) and len(spans) == B
    keep, offs, pos, reqs = [], [], [], []
    qsl = np.zeros(B + 1, dtype=np.int32)
    shift = np.zeros(B, dtype=np.int64)
    dummy = np.zeros(B, dtype=bool)
    d_rows = np.zeros(B, dtype=np.int64)
    t_rows = np.zeros(B, dtype=np.int64)
    identity = True
    for i in range(B):
        s, lo, hi = int(num_computed[i]), int(query_start_loc[i]), int(query_start_loc[i + 1])
        q = hi - lo
        sp = spans[i]
        p = s + np.arange(q, dtype=np.int64)
        plen = None if prompt_lens is None else int(prompt_lens[i])
        if plen is not None:
            t_rows[i] = int((p < plen).sum())
        if q == 0:
            qsl[i + 1] = qsl[i]
            continue
        if len(sp) == 0 or s >= int((sp[:, 0] + sp[:, 1]).max()):
            # Fast path: the window lies after every image (or there is none): keep all rows,
            # shifted by the constant number of rows dropped before them.
            d_total = int(dropped_before(sp, np.array([s]))[0]) if len(sp) else 0
            rows = np.arange(lo, hi, dtype=np.int64)
            off = np.full(q, d_total, dtype=np.int64)
            kept_p = p
        else:
            drop = is_dropped(sp, p)
            kept_p = p[~drop]
            rows = lo + np.nonzero(~drop)[0].astype(np.int64)
            off = dropped_before(sp, kept_p)
            if len(rows) == 0:
                end = np.array([s + q], dtype=np.int64)
                c_dummy = int(end[0] - dropped_before(sp, end)[0])
                rows = np.array([hi - 1], dtype=np.int64)
                off = np.array([int(p[-1]) - c_dummy], dtype=np.int64)
                dummy[i] = True
        if plen is not None and not dummy[i]:
            d_rows[i] = int((kept_p < plen).sum())
        identity &= len(rows) == q and not off.any()
        keep.append(rows)
        offs.append(off)
        pos.append(s + (rows - lo) - off)  # target position - offset
        reqs.append(np.full(len(rows), i, dtype=np.int64))
        qsl[i + 1] = qsl[i] + len(rows)
        c_last = s + int(rows[-1] - lo) - int(off[-1])  # drafter position of the last kept row
        shift[i] = (s + q) - (c_last + 1)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return StepPlan(keep_idx=cat(keep), offset=cat(offs), positions=cat(pos), req_of_row=cat(reqs), query_start_loc=qsl,
                    seq_shift=shift, dummy=dummy, drafter_prompt_rows=d_rows, target_prompt_rows=t_rows,
                    identity=bool(identity), keeps_all=sum(map(len, keep)) == int(query_start_loc[-1]))


@pytest.mark.parametrize("seed", range(30))
def test_vectorized_plan_equals_the_per_request_loop(seed):
    rng = np.random.default_rng(seed)
    B = int(rng.integers(1, 9))
    num_computed, q, spans, plens = [], [], [], []
    for _ in range(B):
        n_img = int(rng.integers(0, 3))
        offs = np.sort(rng.choice(np.arange(0, 60), size=n_img, replace=False)) if n_img else []
        sp, last = [], -1
        for off in offs:
            if off > last:
                ln = int(rng.integers(1, 12))
                sp.append((int(off), ln))
                last = off + ln
        spans.append(as_spans(sp))
        plen = int(max([o + n for o, n in sp], default=0) + rng.integers(1, 10))
        s = int(rng.integers(0, plen + 5))
        num_computed.append(s)
        q.append(int(rng.integers(0, 20)))
        plens.append(plen)
    qsl = np.concatenate([[0], np.cumsum(q)]).astype(np.int64)
    args = (np.array(num_computed, dtype=np.int64), qsl, spans, np.array(plens))
    got, want = plan_step(*args), plan_step_loop(*args)
    # each request's dropped ranges computed once and stacked (the proposer's cache) are the batch's
    from vllm_hivis.method.plan import dropped_ranges, stack_ranges

    stacked = stack_ranges([dropped_ranges([sp]) for sp in spans])
    lo, hi = dropped_ranges(spans)
    assert np.array_equal(stacked[0], lo) and np.array_equal(stacked[1], hi)
    cached = plan_step(*args, ranges=stacked)
    assert np.array_equal(cached.keep_idx, got.keep_idx) and np.array_equal(cached.positions, got.positions)
    for field in ("keep_idx", "offset", "req_of_row", "query_start_loc", "seq_shift", "dummy",
                  "drafter_prompt_rows", "target_prompt_rows"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), field
    assert got.identity == want.identity and got.keeps_all == want.keeps_all
    assert np.array_equal(got.positions, want.positions)


def test_write_limits_are_window_end_plus_lookahead():
    """The last target position a request's drafter may write: num_computed + its rows this step +
    k lookahead rows (padded query_start_loc entries past B are ignored)."""
    from vllm_hivis.method.plan import write_limits

    got = write_limits(np.array([3, 10]), np.array([0, 4, 5, 5, 5]), 5)
    assert got.tolist() == [3 + 4 + 5, 10 + 1 + 5] and got.dtype == np.int64


@pytest.mark.parametrize("seed", range(20))
def test_the_steady_decode_plan_equals_plan_step(seed):
    """plan_decode (the proposer's per-step fast path) returns plan_step's plan whenever every
    window starts past its request's prompt and images, and declines otherwise."""
    from vllm_hivis.method.plan import dropped_ranges, plan_decode, stack_ranges, steady_batch

    rng = np.random.default_rng(100 + seed)
    B = int(rng.integers(1, 9))
    spans, plens = [], []
    for _ in range(B):
        sp, at = [], int(rng.integers(0, 4))
        for _ in range(int(rng.integers(0, 3))):
            ln = int(rng.integers(1, 30))
            sp.append((at, ln))
            at += ln + int(rng.integers(1, 6))
        spans.append(as_spans(sp))
        plens.append(at + int(rng.integers(0, 8)))
    plens = np.array(plens, dtype=np.int64)
    steady = steady_batch(("batch", seed), stack_ranges([dropped_ranges([sp]) for sp in spans]), plens)
    for trial in range(6):
        early = trial % 3 == 2  # one request still inside its prompt: not steady
        num_computed = plens + rng.integers(0, 40, size=B)
        if early:
            num_computed[int(rng.integers(0, B))] = int(rng.integers(0, 3))
        q = rng.integers(1, 7, size=B)
        qsl = np.concatenate([[0], np.cumsum(q)]).astype(np.int32)
        want = plan_step(num_computed, qsl.astype(np.int64), spans, plens)
        got = plan_decode(num_computed.astype(np.int32), qsl, steady)
        if early and want.target_prompt_rows.any():
            assert got is None
            continue
        if got is None:  # an early window that happened to start exactly at clear_from
            assert early
            continue
        for field in ("keep_idx", "offset", "positions", "req_of_row", "query_start_loc", "seq_shift", "dummy",
                      "drafter_prompt_rows", "target_prompt_rows", "drop_lo", "drop_hi"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), field
        assert got.identity == want.identity and got.keeps_all and want.keeps_all
    empty = np.concatenate([[0], np.cumsum(np.r_[np.zeros(1, int), np.ones(B - 1, int)])]).astype(np.int32)
    assert plan_decode(plens, empty, steady) is None  # a request without rows: the general path
