"""Headless locust runs of loadtest/prompts.py against the fake server: the report, the requests, the failures.

Every run is bounded twice (locust's -t and a subprocess timeout) and targets 127.0.0.1 only.
"""

from __future__ import annotations

import csv
import json
import socket

import pytest
from fake_openai_server import FakeServer, count_tokens
from locust_harness import run_locust

from loadtest.workload import load_prompts

SEQ_LEN = 24
RUNS = 2


def _reference(tmp_path, entries: dict[int, tuple[str, str]]):
    path = tmp_path / "reference.json"
    path.write_text(
        json.dumps(
            {
                "prompts": [
                    {"id": i, "prompt": p, "generated_text": t, "e2e_ms": {"p99": 500.0}, "throughput_tok_s": 40.0}
                    for i, (p, t) in entries.items()
                ]
            }
        ),
        encoding="utf-8",
    )
    return path


def test_contest_mode_report_requests_and_score(fake_server, prompt_file, tmp_path):
    prompts = ["alpha beta gamma delta", "one two three"]
    outputs = {i: SEQ_LEN - count_tokens(p) for i, p in enumerate(prompts)}
    right = "".join(f" t{k}" for k in range(outputs[0]))
    # The reference doubles as the baseline: p99 500 ms, 40 tokens/s for both prompts.
    reference = _reference(tmp_path, {0: (prompts[0], right), 1: (prompts[1], " not what the server says")})
    run = run_locust(
        fake_server.url,
        tmp_path / "out",
        "--prompt-file",
        str(prompt_file(*prompts)),
        "--seq-len",
        str(SEQ_LEN),
        "--runs-per-prompt",
        str(RUNS),
        "--baseline",
        str(reference),
        "--reference",
        str(reference),
        "--nki-mac-ratio",
        "0.5",
    )
    assert run.returncode == 0, run.output

    # The wire: per prompt 1 warm-up + RUNS timed requests, in file order, in the contest's terms.
    bodies = fake_server.requests
    assert [b["prompt"] for b in bodies] == [prompts[0]] * (1 + RUNS) + [prompts[1]] * (1 + RUNS)
    for body in bodies:
        n = outputs[prompts.index(body["prompt"])]
        assert (body["max_tokens"], body["min_tokens"]) == (n, n)
        assert body["temperature"] == 0 and body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True} and body["model"] == "fake-model"

    report = run.report
    assert report["run"]["mode"] == "contest" and report["run"]["seq_len"] == SEQ_LEN
    assert report["run"]["nki_mac_ratio"] == 0.5 and report["run"]["model"] == "fake-model"
    first, second = report["prompts"]
    for entry, prompt in zip(report["prompts"], prompts):
        assert entry["runs"] == entry["runs_ok"] == RUNS and entry["failures"] == 0
        assert entry["prompt_tokens"] + entry["output_tokens"] == SEQ_LEN
        assert entry["e2e_ms"]["p50"] <= entry["e2e_ms"]["p99"] and entry["ttft_ms"]["p50"] < entry["e2e_ms"]["p50"]
        assert entry["itl_ms"]["count"] == RUNS * (entry["output_tokens"] - 1)
        assert entry["tpot_ms"]["mean"] > 0 and entry["prompt"] == prompt
    assert (first["accuracy"], second["accuracy"]) == (1.0, 0.0)
    assert first["generated_text"] == right
    expected = (500.0 / first["e2e_ms"]["p99"]) * (first["throughput_tok_s"] / 40.0) * 1.5
    assert first["score"] == pytest.approx(expected) and second["score"] == 0.0
    assert report["totals"]["score"] == pytest.approx(expected)

    rows = list(csv.DictReader((run.report_dir / "report.csv").open()))
    assert [r["id"] for r in rows] == ["0", "1", "TOTAL"]
    for png in ("latency_vs_baseline.png", "ttft_itl.png", "e2e_runs.png"):
        assert (run.report_dir / png).stat().st_size > 10_000
    # The custom metrics are in locust's own statistics, beside the completions with their real E2E time.
    for row in ("METRIC", "TTFT", "TPOT", "/v1/completions 0:alpha beta gamma delta", "warm-up 1:one two three"):
        assert row in run.output


def test_default_workload_is_the_contest_prompts(tmp_path):
    with FakeServer(token_delay_s=0.0) as server:
        run = run_locust(server.url, tmp_path / "out", "--runs-per-prompt", "1", "--baseline", "trn2")
    assert run.returncode == 0, run.output
    report = run.report
    contest = load_prompts()
    assert [e["name"] for e in report["prompts"]] == ["Twelve Days", "Palindrome", "Seating", "Quote", "Haystack"]
    assert [b["prompt"] for b in server.requests] == [p.text for p in contest for _ in range(2)]
    assert all(e["prompt_tokens"] + e["output_tokens"] == 640 for e in report["prompts"])
    assert all(e["score"] is not None and e["baseline"]["p99_ms"] > 0 for e in report["prompts"])


def test_failures_are_reported_and_the_report_still_written(fake_server, prompt_file, tmp_path):
    fake_server.stall_s = 3.0
    prompts = [
        "good prompt",
        "FAIL500 always",
        "FLAKY sometimes",
        "STALL for a while",
        "TRUNCATE early",
        "NODONE at the end",
        " ".join(["long"] * SEQ_LEN),
    ]
    run = run_locust(
        fake_server.url,
        tmp_path / "out",
        "--prompt-file",
        str(prompt_file(*prompts)),
        "--seq-len",
        str(SEQ_LEN),
        "--runs-per-prompt",
        str(RUNS),
        "--stall-timeout",
        "1",
        "--baseline",
        "trn2",
    )
    assert run.returncode == 1, run.output  # locust's exit code when requests failed
    report = run.report
    by_id = {e["id"]: e for e in report["prompts"]}
    assert by_id[0]["runs_ok"] == RUNS and by_id[0]["score"] is not None
    assert by_id[2]["runs_ok"] == 1 and by_id[2]["score"] is None  # every other request fails
    for pid in (1, 3, 4, 5):
        assert by_id[pid]["runs_ok"] == 0 and by_id[pid]["failures"] == RUNS and by_id[pid]["score"] is None
    assert by_id[6]["runs"] == 0 and "--seq-len=24" in by_id[6]["notes"][0]
    reasons = {f["prompt_id"]: f["error"] for f in report["failures"]}
    assert reasons[1].startswith("HTTP 500") and reasons[2].startswith("HTTP 500")
    assert reasons[3].startswith("stall") and reasons[4].startswith("truncated stream")
    assert "without [DONE]" in reasons[5]
    assert report["totals"]["failures"] == 1 + 4 * RUNS
    assert report["totals"]["score"] is None  # one prompt of seven scored: only a partial sum
    assert report["totals"]["score_partial"] == pytest.approx(by_id[0]["score"])
    assert "HTTP 500" in run.output and "truncated stream" in run.output  # locust's own failure table


def test_load_mode_with_several_users(prompt_file, tmp_path):
    prompts = ["alpha beta gamma delta", "one two three"]
    # No /tokenize (token counts come from a completion's usage), and an API key as vLLM's --api-key.
    with FakeServer(tokenize=False, api_key="sesame") as server:
        run = run_locust(
            server.url,
            tmp_path / "out",
            "--mode",
            "load",
            "--prompt-file",
            str(prompt_file(*prompts)),
            "--seq-len",
            "40",
            "--api-key",
            "sesame",
            users=3,
            spawn_rate=3,
            run_time="4s",
        )
    assert run.returncode == 0, run.output
    report = run.report
    assert report["run"]["mode"] == "load" and report["run"]["users_max"] == 3
    assert all(e["runs_ok"] >= 3 and e["score"] is None for e in report["prompts"])
    assert report["prompts"][0]["output_tokens"] == 36 and report["prompts"][1]["output_tokens"] == 37
    assert report["concurrency"] and report["concurrency"][-1]["users"] == 3
    assert report["concurrency"][-1]["output_tok_s"] > 0
    assert (run.report_dir / "throughput_vs_concurrency.png").stat().st_size > 10_000
    assert "(token count)" in run.output


def test_unreachable_server_ends_the_run_with_a_reason(tmp_path):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = run_locust(f"http://127.0.0.1:{port}", tmp_path / "out", "--runs-per-prompt", "1")
    assert run.returncode == 2, run.output
    assert "/v1/models" in run.report["run"]["fatal"]


def test_invalid_option_is_refused(fake_server, tmp_path):
    run = run_locust(fake_server.url, tmp_path / "out", "--nki-mac-ratio", "2")
    assert run.returncode == 2 and "--nki-mac-ratio=2.0" in run.output
    assert fake_server.requests == []


def test_auto_mac_ratio_is_computed_from_the_served_checkpoint(prompt_file, tmp_path):
    from tests.loadtest.fake_openai_server import FakeServer
    from tests.tools.test_mac_ratio import TINY
    from vllm_nki_moe.tools import mac_ratio
    from vllm_nki_moe.tools.kernel_check.shapes import kernel_shapes

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(TINY))
    shapes = kernel_shapes(TINY, 2)
    rows = mac_ratio.phase_macs(shapes, "prefill", 128, 128, "nki") + mac_ratio.phase_macs(
        shapes, "decode", 1, 640, "nki"
    )
    with FakeServer(root=str(checkpoint)) as server:
        prompts = str(prompt_file("alpha beta gamma delta"))
        args = ("--prompt-file", prompts, "--runs-per-prompt", "1", "--nki-mac-ratio", "auto")
        run = run_locust(server.url, tmp_path / "out", *args, "--mac-ratio-tp", "2")
    assert run.returncode == 0, run.output
    assert run.report["run"]["nki_mac_ratio"] == pytest.approx(mac_ratio.ratio(rows))
    assert (
        f"computed by vllm-nki-moe mac-ratio for {checkpoint} (TP 2, kernels nki"
        in run.report["run"]["nki_mac_ratio_note"]
    )


def test_auto_mac_ratio_without_a_checkpoint_stops_with_the_reason(fake_server, prompt_file, tmp_path):
    prompts = str(prompt_file("alpha beta gamma delta"))
    run = run_locust(fake_server.url, tmp_path / "out", "--prompt-file", prompts, "--nki-mac-ratio", "auto")
    assert run.returncode == 2
    assert "gives no 'root'" in run.report["run"]["fatal"] and fake_server.requests == []


def test_a_mac_ratio_that_is_neither_a_number_nor_auto_is_refused(fake_server, tmp_path):
    run = run_locust(fake_server.url, tmp_path / "out", "--nki-mac-ratio", "high")
    assert run.returncode == 2 and "--nki-mac-ratio='high'; a number in [0, 1] or 'auto'" in run.output
