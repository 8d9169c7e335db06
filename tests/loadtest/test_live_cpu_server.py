"""The load test against the real tiny CPU vLLM server (tests/conftest.py ``tiny_server``): a complete report.

Two contest-mode runs: the first writes a report; the second uses it as baseline and accuracy reference, so greedy
decoding must reproduce the same text (accuracy 1) and the score must be defined.
"""

from __future__ import annotations

import pytest
from locust_harness import run_locust

SEQ_LEN = 32
RUNS = 2
PROMPTS = ("The capital of France is", "Count from one to ten: one, two,")

pytestmark = pytest.mark.server


def test_contest_mode_against_the_tiny_cpu_server(tiny_server, prompt_file, tmp_path):
    prompts = prompt_file(*PROMPTS)
    common = (
        "--prompt-file",
        str(prompts),
        "--seq-len",
        str(SEQ_LEN),
        "--runs-per-prompt",
        str(RUNS),
        "--stall-timeout",
        "60",
        "--request-timeout",
        "120",
    )
    first = run_locust(tiny_server.url, tmp_path / "first", *common, timeout_s=300)
    assert first.returncode == 0, first.output
    report = first.report
    assert report["run"]["model"] == tiny_server.model and report["run"]["host"] == tiny_server.url
    assert [e["prompt"] for e in report["prompts"]] == list(PROMPTS)
    for entry in report["prompts"]:
        assert entry["runs"] == entry["runs_ok"] == RUNS, entry["notes"]
        assert entry["prompt_tokens"] + entry["output_tokens"] == SEQ_LEN  # ignore_eos + min_tokens held
        assert entry["e2e_ms"]["p99"] >= entry["e2e_ms"]["p50"] > entry["ttft_ms"]["p50"] > 0
        assert entry["tpot_ms"]["mean"] > 0 and entry["itl_ms"]["count"] > 0
        assert entry["throughput_tok_s"] > entry["output_tok_s"] > 0
        assert entry["generated_text"] and entry["self_consistent"]  # greedy: every run says the same
    for name in (
        "report.json",
        "report.csv",
        "requests.csv",
        "latency_vs_baseline.png",
        "ttft_itl.png",
        "e2e_runs.png",
    ):
        assert (first.report_dir / name).exists(), name

    report_json = str(first.report_dir / "report.json")
    second = run_locust(
        tiny_server.url,
        tmp_path / "second",
        *common,
        "--baseline",
        report_json,
        "--reference",
        report_json,
        timeout_s=300,
    )
    assert second.returncode == 0, second.output
    again = second.report
    assert [e["accuracy"] for e in again["prompts"]] == [1.0, 1.0]
    assert all(e["score"] > 0 for e in again["prompts"])
    assert again["totals"]["prompts_scored"] == 2
