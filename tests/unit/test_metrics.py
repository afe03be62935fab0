"""Prefill counters (worker side), the Prometheus collector (frontend side), acceptance figures."""

from vllm_hivis.serving import metrics
from vllm_hivis.serving.acceptance import Acceptance, from_prometheus_text
from vllm_hivis.serving.metrics import MAX_PENDING, PrefillCollector, PrefillCounters, read_totals


def test_counters_fold_requests_when_their_prompt_is_done(tmp_path):
    c = PrefillCounters(str(tmp_path))
    c.add("a", 5, 40, prompt_done=False)  # first chunk
    assert read_totals(str(tmp_path))["requests"] == 0
    c.add("a", 8, 54, prompt_done=True)  # last chunk
    c.add("b", 12, 12, prompt_done=True)  # text-only request: drafter sees every row
    c.add("c", 3, 30, prompt_done=False)  # c's prompt is not done: not counted yet
    assert read_totals(str(tmp_path)) == {"drafter": 25, "target": 106, "requests": 2}
    other = PrefillCounters(str(tmp_path))  # a second worker process adds up
    other.add("d", 1, 10, prompt_done=True)
    assert read_totals(str(tmp_path)) == {"drafter": 26, "target": 116, "requests": 3}
    for i in range(MAX_PENDING + 5):  # aborted mid-prompt requests do not pile up
        other.add(f"x{i}", 1, 1, prompt_done=False)
    assert len(other.pending) <= MAX_PENDING + 1
    c.add("c", 4, 40, prompt_done=True)  # its last chunk, after skipping steps
    assert read_totals(str(tmp_path)) == {"drafter": 33, "target": 186, "requests": 4}
    fams = {f.name: f.samples[0].value for f in PrefillCollector([tmp_path]).collect()}
    assert fams == {"vllm:hivis_drafter_prefill_tokens": 33, "vllm:hivis_target_prefill_tokens": 186,
                    "vllm:hivis_prefill_requests": 4}


PROM = """
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 30.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 21.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 9.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 7.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 5.0
vllm:hivis_drafter_prefill_tokens_total 13.0
vllm:hivis_target_prefill_tokens_total 94.0
vllm:spec_decode_num_drafts_created 1.7e9
"""


def test_acceptance_from_prometheus():
    a = from_prometheus_text(PROM)
    assert (a.num_drafts, a.num_draft_tokens, a.num_accepted) == (10, 30, 21)
    assert a.per_position == [0.9, 0.7, 0.5]
    assert abs(a.accepted_per_draft - 2.1) < 1e-9 and abs(a.tokens_per_step - 3.1) < 1e-9
    assert abs(a.prefill_ratio - 13 / 94) < 1e-9
    d = a.minus(Acceptance(4, 12, 6, [3, 2, 1], 0, 0))
    assert (d.num_drafts, d.num_accepted, d.per_position_counts) == (6, 15, [6, 5, 4])
    both = d.plus(Acceptance(4, 12, 6, [3, 2], 1, 5))  # runs with fewer positions pad with zeros
    assert (both.num_drafts, both.num_accepted, both.per_position_counts) == (10, 21, [9, 7, 4])
    assert (both.drafter_prefill_tokens, both.target_prefill_tokens) == (a.drafter_prefill_tokens + 1,
                                                                        a.target_prefill_tokens + 5)


def test_counted_once_per_engine_and_per_run(tmp_path, monkeypatch):
    """Tensor-parallel ranks see the same rows: only the first counts. A run's counters live in
    its own directory (vLLM's instance_id) under the root: files of earlier runs, or of other
    servers sharing a user-set root, are never summed; nothing per-run is in the environment."""
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path))
    old = metrics.run_dir("111")  # an earlier run, same root
    PrefillCounters(old).add("x", 7, 70, prompt_done=True)
    (tmp_path / "stale.json").write_text('{"drafter": 1000, "target": 1000, "requests": 9}')
    d = metrics.run_dir("222")
    assert d == tmp_path / "222"
    rank0, rank1 = PrefillCounters(d, writer=True), PrefillCounters(d, writer=False)
    for c in (rank0, rank1):
        c.add("a", 5, 50, prompt_done=True)
    assert read_totals(d) == {"drafter": 5, "target": 50, "requests": 1}
    collector = PrefillCollector([d])
    fams = {f.name: f.samples[0].value for f in collector.collect()}
    assert fams["vllm:hivis_drafter_prefill_tokens"] == 5 and fams["vllm:hivis_prefill_requests"] == 1
    monkeypatch.delenv(metrics.STATS_DIR_ENV)
    assert metrics.stats_root().name.startswith("vllm-hivis-stats-")  # stable default: no per-run env var
