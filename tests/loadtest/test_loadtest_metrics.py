"""Percentiles, throughputs and the contest score on hand-made samples and the contest's own tables."""

from __future__ import annotations

import pytest

from loadtest.metrics import (
    Sample,
    accuracy_against,
    by_concurrency,
    contest_score,
    contest_throughput,
    output_throughput,
    percentile,
    summarize,
)
from loadtest.workload import CONTEST_BASELINES, load_baseline

# 1st place MLSys'26, prompt 0 on trn3 (research/contest.md, section 2.1, thustorage score records):
# latency ms, tokens/s, NKI ratio, recorded score; its baseline is prompt_data_trn3.csv row 0.
THUSTORAGE_PROMPT0 = (4078.66, 160.43, 0.9929, 35.48)


@pytest.mark.parametrize("q, expected", [(0, 1.0), (50, 10.5), (90, 18.1), (99, 19.81), (100, 20.0)])
def test_percentile_is_numpy_linear_on_20_runs(q, expected):
    # rank = q/100 * (n - 1) on 1..20: p99 -> rank 18.81 -> 19 + 0.81 * (20 - 19)
    assert percentile([float(v) for v in range(20, 0, -1)], q) == pytest.approx(expected)


def test_percentile_matches_numpy_default():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 20, 37):
        values = list(rng.exponential(100.0, size=n))
        for q in (0, 1, 50, 90, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


@pytest.mark.parametrize("values, q", [([], 50), ([1.0], -1), ([1.0], 101)])
def test_percentile_rejects_bad_input(values, q):
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, q)


def test_summarize_converts_seconds_to_ms():
    out = summarize([0.1, 0.2, 0.3, 0.4])
    assert out["count"] == 4
    assert out["mean"] == pytest.approx(250.0)
    assert out["p50"] == pytest.approx(250.0)
    assert out["min"] == pytest.approx(100.0) and out["max"] == pytest.approx(400.0)
    assert summarize([]) is None


def _sample(e2e_s, prompt_tokens=10, output_tokens=30, ok=True, **kw):
    return Sample(prompt_id=0, ok=ok, e2e_s=e2e_s, prompt_tokens=prompt_tokens, output_tokens=output_tokens, **kw)


def test_contest_throughput_is_all_tokens_over_mean_latency():
    samples = [_sample(1.0), _sample(3.0)]  # mean 2 s, 40 tokens per request
    assert contest_throughput(samples) == pytest.approx(20.0)
    assert output_throughput(samples) == pytest.approx(15.0)


def test_throughputs_ignore_failed_samples_and_are_none_without_any():
    samples = [_sample(2.0), _sample(0.01, ok=False, output_tokens=0)]
    assert contest_throughput(samples) == pytest.approx(20.0)
    assert contest_throughput([_sample(1.0, ok=False)]) is None
    assert output_throughput([]) is None


def test_score_worked_by_hand():
    # base 1000 ms / 500 ms = 2; 250 / 100 tok/s = 2.5; (1 + 0.5) = 1.5 -> 7.5
    assert contest_score(
        accuracy=1.0, p99_ms=500.0, throughput=250.0, base_p99_ms=1000.0, base_throughput=100.0, mac_ratio=0.5
    ) == pytest.approx(7.5)
    assert (
        contest_score(
            accuracy=0.0, p99_ms=500.0, throughput=250.0, base_p99_ms=1000.0, base_throughput=100.0, mac_ratio=0.5
        )
        == 0.0
    )


@pytest.mark.parametrize("table", sorted(CONTEST_BASELINES))
@pytest.mark.parametrize("ratio", [0.0, 0.9929])
def test_run_equal_to_contest_baseline_scores_one_plus_ratio(table, ratio):
    baselines = load_baseline(table)
    assert sorted(baselines) == [0, 1, 2, 3, 4]
    for base in baselines.values():
        score = contest_score(
            accuracy=1.0,
            p99_ms=base.p99_ms,
            throughput=base.throughput_tok_s,
            base_p99_ms=base.p99_ms,
            base_throughput=base.throughput_tok_s,
            mac_ratio=ratio,
        )
        assert score == pytest.approx(1.0 + ratio)


def test_score_reproduces_a_recorded_contest_score():
    latency, throughput, ratio, recorded = THUSTORAGE_PROMPT0
    base = load_baseline("trn3")[0]
    score = contest_score(
        accuracy=1.0,
        p99_ms=latency,
        throughput=throughput,
        base_p99_ms=base.p99_ms,
        base_throughput=base.throughput_tok_s,
        mac_ratio=ratio,
    )
    assert score == pytest.approx(recorded, abs=0.01)


@pytest.mark.parametrize(
    "field, value",
    [("p99_ms", 0.0), ("throughput", -1.0), ("base_p99_ms", 0.0), ("base_throughput", 0.0), ("mac_ratio", 1.5)],
)
def test_score_rejects_impossible_inputs(field, value):
    args = dict(accuracy=1.0, p99_ms=1.0, throughput=1.0, base_p99_ms=1.0, base_throughput=1.0, mac_ratio=0.0)
    args[field] = value
    with pytest.raises(ValueError, match=field):
        contest_score(**args)


def test_accuracy_requires_every_text_to_match():
    assert accuracy_against(["a", "a"], "a") == 1.0
    assert accuracy_against(["a", "b"], "a") == 0.0
    assert accuracy_against(["a"], None) is None
    assert accuracy_against([], "a") is None


def test_by_concurrency_groups_by_user_count():
    # 1 user: two back-to-back 1 s requests of 10 tokens -> 20 tokens over 2 s
    # 2 users: four 1 s requests in parallel pairs from t=2 -> 40 tokens over 2 s
    samples = [
        _sample(1.0, output_tokens=10, started_at=0.0, users=1, ttft_s=0.1),
        _sample(1.0, output_tokens=10, started_at=1.0, users=1, ttft_s=0.3),
        *[_sample(1.0, output_tokens=10, started_at=2.0 + i // 2, users=2, ttft_s=0.2) for i in range(4)],
        _sample(5.0, output_tokens=0, started_at=2.0, users=2, ok=False),
    ]
    one, two = by_concurrency(samples)
    assert (one.users, one.requests) == (1, 2) and one.output_tok_s == pytest.approx(10.0)
    assert one.ttft_p50_ms == pytest.approx(200.0)
    assert (two.users, two.requests) == (2, 4) and two.output_tok_s == pytest.approx(20.0)
    assert two.requests_per_s == pytest.approx(2.0)
