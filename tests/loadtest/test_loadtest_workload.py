"""Prompt files, baselines and references: the shipped contest data and files of our own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.workload import (
    CONTEST_PROMPTS,
    DATA_DIR,
    load_baseline,
    load_prompts,
    load_reference,
    split_prompts,
)

SHARED_CONTEST = Path(__file__).resolve().parents[3] / "shared" / "contest"  # the team's copy, when present
# Contest CSV "Context Length" per public prompt (Qwen3 tokenizer), research/contest.md section 1.4
CONTEST_CONTEXT_LENGTHS = {0: 18, 1: 126, 2: 43, 3: 10, 4: 402}


@pytest.mark.parametrize("name", ["prompts.txt", "prompt_data_trn2.csv", "prompt_data_trn3.csv"])
def test_shipped_data_is_byte_for_byte_the_contests(name):
    if not (SHARED_CONTEST / name).exists():
        pytest.skip(f"no shared contest copy at {SHARED_CONTEST}")
    assert (DATA_DIR / name).read_bytes() == (SHARED_CONTEST / name).read_bytes()


def test_contest_prompts_split_like_the_harness():
    prompts = load_prompts()
    assert [p.name for p in prompts] == ["Twelve Days", "Palindrome", "Seating", "Quote", "Haystack"]
    assert [p.id for p in prompts] == [0, 1, 2, 3, 4]
    assert prompts[3].text == 'Explain the quote \\"I do desire we may be better strangers\\"'  # literal \" kept
    assert prompts[1].text.count("\n") == 6  # its 7 lines stay one prompt: only blank lines separate
    assert prompts[4].text.endswith("UNANSWERABLE.")  # stripped like the harness: no trailing newline
    assert load_prompts(CONTEST_PROMPTS) == prompts


def test_own_prompt_files_are_named_after_their_first_words(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n\nfirst prompt with many words in it\n\n\n\nsecond\nline two\n\n", encoding="utf-8")
    prompts = load_prompts(path)
    assert [(p.id, p.name, p.text) for p in prompts] == [
        (0, "first prompt with many", "first prompt with many words in it"),
        (1, "second line two", "second\nline two"),
    ]


def test_empty_prompt_file_is_rejected(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="prompts=0"):
        load_prompts(path)


def test_split_prompts_matches_harness_rule():
    assert split_prompts("a\n\n\nb \n\n") == ["a", "b"]


@pytest.mark.parametrize("table", ["trn2", "trn3"])
def test_contest_baseline_tables(table):
    baselines = load_baseline(table)
    assert {i: b.prompt_tokens for i, b in baselines.items()} == CONTEST_CONTEXT_LENGTHS
    assert load_baseline(DATA_DIR / f"prompt_data_{table}.csv") == baselines
    # latency in ms and throughput in tok/s: 640 tokens / mean latency is close to the tabled throughput
    for b in baselines.values():
        assert 0.9 < 640 / (b.p99_ms / 1000) / b.throughput_tok_s < 1.1


def test_trn2_baseline_values():
    b = load_baseline("trn2")[4]
    assert (b.p99_ms, b.throughput_tok_s, b.prompt_tokens) == (3041.92, 217.74, 402)


def test_bad_baseline_csv_is_rejected(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,latency\n0,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header"):
        load_baseline(path)


def _report(tmp_path, entries) -> Path:
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"prompts": entries}), encoding="utf-8")
    return path


def test_baseline_and_reference_from_an_earlier_report(tmp_path):
    path = _report(
        tmp_path,
        [
            {
                "id": 0,
                "prompt": "p0",
                "prompt_tokens": 4,
                "e2e_ms": {"p99": 120.0},
                "throughput_tok_s": 50.0,
                "generated_text": " t0 t1",
            },
            {"id": 1, "prompt": "p1", "e2e_ms": None, "throughput_tok_s": None, "generated_text": None},
        ],
    )
    baselines = load_baseline(path)
    assert list(baselines) == [0]
    assert (baselines[0].p99_ms, baselines[0].throughput_tok_s, baselines[0].prompt_tokens) == (120.0, 50.0, 4)
    assert load_reference(path) == {0: ("p0", " t0 t1")}


def test_report_without_prompts_is_rejected(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="prompts=missing"):
        load_reference(path)
