"""The report built from hand-made samples: per-prompt figures, score rules, CSV and figures on disk."""

from __future__ import annotations

import csv

import pytest

from loadtest.metrics import Sample
from loadtest.report import build_report, format_table, write_report
from loadtest.workload import Baseline, Prompt, load_baseline, load_reference

PROMPTS = [Prompt(0, "alpha", "alpha prompt"), Prompt(1, "beta", "beta prompt text")]
PROMPT_TOKENS = {0: 2, 1: 3}
REQUESTED = {0: 8, 1: 7}
RUN = {"host": "http://127.0.0.1:1", "model": "m", "mode": "contest", "seq_len": 10, "runs_per_prompt": 4}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def samples(prompt_id: int, e2e: list[float], *, text: str = " t0", ok: bool = True) -> list[Sample]:
    out = []
    for i, e in enumerate(e2e):
        out.append(
            Sample(
                prompt_id=prompt_id,
                ok=ok,
                e2e_s=e,
                ttft_s=e / 10,
                tpot_s=e / 20,
                itl_s=[e / 20] * 3,
                prompt_tokens=PROMPT_TOKENS[prompt_id],
                output_tokens=REQUESTED[prompt_id] if ok else 0,
                text=text if ok else "",
                error=None if ok else "HTTP 500: x",
                started_at=float(i),
            )
        )
    return out


def build(all_samples, **kw):
    args = dict(
        prompts=PROMPTS,
        samples=all_samples,
        run=RUN,
        prompt_tokens=PROMPT_TOKENS,
        requested_tokens=REQUESTED,
        baselines={},
        references={},
        mac_ratio=0.0,
    )
    args.update(kw)
    return build_report(**args)


def test_per_prompt_figures_by_hand():
    report = build(samples(0, [1.0, 2.0, 3.0, 4.0]) + samples(1, [0.5] * 4))
    alpha = report["prompts"][0]
    assert alpha["e2e_ms"]["p50"] == pytest.approx(2500.0)
    assert alpha["e2e_ms"]["p99"] == pytest.approx(3970.0)  # rank 2.97 between 3000 and 4000
    assert alpha["throughput_tok_s"] == pytest.approx(10 / 2.5)  # (2 + 8 tokens) / mean 2.5 s
    assert alpha["output_tok_s"] == pytest.approx(8 / 2.5)
    assert (alpha["prompt_tokens"], alpha["output_tokens"], alpha["runs_ok"]) == (2, 8, 4)
    assert alpha["accuracy"] is None and alpha["score"] is None and alpha["self_consistent"]
    assert report["totals"]["requests"] == 8 and report["totals"]["score"] is None
    assert report["concurrency"] == []  # contest mode


def test_run_scored_against_itself_scores_one_plus_ratio(tmp_path):
    data = samples(0, [1.0, 1.1, 0.9, 1.3]) + samples(1, [0.4, 0.5, 0.45, 0.6])
    first = build(data)
    write_report(first, data, tmp_path, plots=False)
    report = build(
        data,
        baselines=load_baseline(tmp_path / "report.json"),
        references=load_reference(tmp_path / "report.json"),
        mac_ratio=0.25,
    )
    assert [e["score"] for e in report["prompts"]] == [pytest.approx(1.25)] * 2
    assert [e["accuracy"] for e in report["prompts"]] == [1.0, 1.0]
    assert report["totals"]["score"] == pytest.approx(2.5)


def test_accuracy_zero_zeroes_the_score():
    data = samples(0, [1.0] * 4, text=" different") + samples(1, [1.0] * 4)
    refs = {0: ("alpha prompt", " t0"), 1: ("beta prompt text", " t0")}
    base = {0: Baseline(1000.0, 10.0, 2, "x"), 1: Baseline(1000.0, 10.0, 3, "x")}
    report = build(data, baselines=base, references=refs)
    assert [e["accuracy"] for e in report["prompts"]] == [0.0, 1.0]
    assert report["prompts"][0]["score"] == 0.0
    assert report["prompts"][1]["score"] == pytest.approx(1.0)  # 1000/1000 x 10/10


def test_reference_for_another_prompt_text_is_ignored():
    report = build(samples(0, [1.0]) + samples(1, [1.0]), references={0: ("another prompt", " t0")})
    assert report["prompts"][0]["accuracy"] is None
    assert any("reference ignored" in n for n in report["prompts"][0]["notes"])


def test_failed_runs_void_the_score_and_are_listed():
    base = {0: Baseline(1000.0, 10.0, 2, "x"), 1: Baseline(1000.0, 10.0, 3, "x")}
    data = samples(0, [1.0, 1.0, 1.0]) + samples(0, [0.01], ok=False) + samples(1, [1.0] * 4)
    report = build(data, baselines=base)
    assert report["prompts"][0]["score"] is None and report["prompts"][0]["failures"] == 1
    assert report["prompts"][1]["score"] == pytest.approx(1.0)
    # one of two prompts scored: a partial sum, never reported as the total
    assert report["totals"]["score"] is None and report["totals"]["prompts_scored"] == 1
    assert report["totals"]["score_partial"] == pytest.approx(1.0)
    assert "total score: none (partial sum 1.000, not a contest total) over 1/2" in format_table(report)
    assert report["failures"] == [{"prompt_id": 0, "error": "HTTP 500: x", "count": 1}]


def test_partial_total_row_in_the_csv_says_partial(tmp_path):
    base = {0: Baseline(1000.0, 10.0, 2, "x"), 1: Baseline(1000.0, 10.0, 3, "x")}
    data = samples(0, [1.0] * 4) + samples(1, [1.0], ok=False)
    write_report(build(data, baselines=base), data, tmp_path, plots=False)
    total = list(csv.DictReader((tmp_path / "report.csv").open()))[-1]
    assert total["id"] == "TOTAL" and total["score"] == ""
    assert total["name"].startswith("partial: 1 of 2 prompts scored, sum 1 (not a contest total)")


@pytest.mark.parametrize("baseline_name", ["trn3", "/data/prompt_data_trn3.csv"])
def test_trn3_without_a_reference_leaves_accuracy_unverified_and_no_score(baseline_name):
    base = {0: Baseline(1000.0, 10.0, 2, "x"), 1: Baseline(1000.0, 10.0, 3, "x")}
    data = samples(0, [1.0] * 4) + samples(1, [1.0] * 4)
    report = build(data, run={**RUN, "baseline": baseline_name}, baselines=base)
    assert all(e["score"] is None for e in report["prompts"])
    assert all(any("accuracy unverified" in n for n in e["notes"]) for e in report["prompts"])
    assert report["totals"]["score"] is None and report["totals"]["score_partial"] is None
    refs = {0: ("alpha prompt", " t0"), 1: ("beta prompt text", " t0")}
    checked = build(data, run={**RUN, "baseline": baseline_name}, baselines=base, references=refs)
    assert checked["totals"]["score"] == pytest.approx(2.0)  # 1000/1000 x 10/10 per prompt, accuracy 1
    on_trn2 = build(data, run={**RUN, "baseline": "trn2"}, baselines=base)  # trn2's harness took accuracy as 1
    assert on_trn2["totals"]["score"] == pytest.approx(2.0)


def test_load_mode_has_no_score_but_a_concurrency_table():
    base = {0: Baseline(1000.0, 10.0, 2, "x")}
    report = build(samples(0, [1.0, 1.0]), run={**RUN, "mode": "load"}, baselines=base)
    assert report["prompts"][0]["score"] is None
    assert report["concurrency"][0]["users"] == 1 and report["concurrency"][0]["requests"] == 2


def test_setup_errors_show_in_notes():
    report = build(samples(0, [1.0]), setup_errors={1: "prompt 1: prompt_tokens=12 >= --seq-len=10"})
    assert report["prompts"][1]["runs"] == 0
    assert "prompt_tokens=12" in report["prompts"][1]["notes"][0]


def test_written_files(tmp_path):
    data = samples(0, [1.0, 2.0]) + samples(1, [0.5, 0.7]) + samples(1, [0.1], ok=False)
    report = build(data, baselines={0: Baseline(3000.0, 5.0, 2, "x")})
    paths = write_report(report, data, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == [
        "e2e_runs.png",
        "latency_vs_baseline.png",
        "report.csv",
        "report.json",
        "requests.csv",
        "ttft_itl.png",
    ]
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [r["id"] for r in rows] == ["0", "1", "TOTAL"]
    assert float(rows[0]["e2e_p99_ms"]) == pytest.approx(1990.0)
    assert float(rows[0]["score"]) == pytest.approx(3000 / 1990 * (10 / 1.5) / 5.0)
    requests = list(csv.DictReader((tmp_path / "requests.csv").open()))
    assert len(requests) == 5 and requests[-1]["error"] == "HTTP 500: x"
    table = format_table(report)
    assert "| 0 | alpha |" in table and "total score" in table
