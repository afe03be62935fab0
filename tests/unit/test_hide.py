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
    """The E.g. blocks of plan_step, drafter_slots, compacted_sample_rows and last_token_indices."""
    import torch

    from vllm_hivis.method.plan import compacted_sample_rows, drafter_slots, last_token_indices

    img = as_spans([(2, 3)])
    plan = plan_step(np.array([0, 7]), np.array([0, 7, 10]), [img, img])
    assert plan.keep_idx.tolist() == [0, 4, 5, 6, 7, 8, 9]
    assert plan.offset.tolist() == [0, 3, 3, 3, 3, 3, 3]
    assert (np.array([0, 4, 5, 6, 7, 8, 9]) - plan.offset).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert plan.req_of_row.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert plan.query_start_loc.tolist() == [0, 4, 7] and plan.seq_shift.tolist() == [3, 3]
    bt = torch.tensor([[7, 2]])
    assert drafter_slots(bt, torch.zeros(4, dtype=torch.long), torch.tensor([0, 3, 4, 5]), 4).tolist() == [28, 31, 8, 9]
    tis = compacted_sample_rows(torch.tensor([6, 9]), torch.tensor([0, 7, 10]), torch.from_numpy(plan.query_start_loc))
    assert tis.tolist() == [3, 6]
    assert last_token_indices(torch.tensor([0, 4, 7]), torch.tensor([0, 1])).tolist() == [3, 5]
