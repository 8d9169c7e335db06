"""The stream parser: TTFT, ITL, E2E, token counts and the failure reasons, from bytes with arrival times."""

from __future__ import annotations

import json

import pytest

from loadtest.stream import StreamReader


def event(text: str | None = None, *, usage: dict | None = None, finish: str | None = None) -> bytes:
    payload = {"choices": [] if text is None else [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage:
        payload["usage"] = usage
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
USAGE_3 = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def feed_all(reader: StreamReader, timed: list[tuple[float, bytes]]) -> None:
    for now, data in timed:
        reader.feed(data, now)


def test_timings_follow_vllm_bench_definitions():
    reader = StreamReader(start=10.0)
    feed_all(
        reader,
        [
            (10.5, b": keep-alive\n\n"),  # comments do not count
            (10.6, event("")),  # an empty text is not the first token
            (11.0, event("Hello")),
            (11.2, event(" big")),
            (11.5, event(" world", finish="length")),
            (11.6, event(usage=USAGE_3)),
            (11.7, DONE),
        ],
    )
    result = reader.finish(12.0, expected_tokens=3)
    assert result.error is None
    assert result.ttft_s == pytest.approx(1.0)
    assert result.itl_s == pytest.approx([0.2, 0.3])
    assert result.e2e_s == pytest.approx(1.7)  # at [DONE], not when the caller closed the stream
    assert result.tpot_s == pytest.approx((1.7 - 1.0) / 2)
    assert (result.text, result.prompt_tokens, result.output_tokens) == ("Hello big world", 5, 3)
    assert result.usage_reported and result.done and result.finish_reason == "length"


def test_events_split_across_reads_are_reassembled():
    body = event("a") + event("b") + event(usage={**USAGE_3, "completion_tokens": 2}) + DONE
    reader = StreamReader(start=0.0)
    for i in range(0, len(body), 7):  # 7-byte reads cut every event somewhere
        reader.feed(body[i : i + 7], now=i / 1000)
    result = reader.finish(1.0, expected_tokens=2)
    assert result.error is None and result.text == "ab" and result.output_tokens == 2


def test_without_usage_text_events_are_counted():
    reader = StreamReader(start=0.0)
    feed_all(reader, [(0.1, event("x")), (0.2, event("y")), (0.3, DONE)])
    result = reader.finish(0.3, expected_tokens=2)
    assert result.error is None and result.output_tokens == 2 and not result.usage_reported


def test_single_token_has_no_tpot():
    reader = StreamReader(start=0.0)
    feed_all(reader, [(0.1, event("x")), (0.2, DONE)])
    assert reader.finish(0.2).tpot_s is None


@pytest.mark.parametrize(
    "timed, expected, reason",
    [
        ([(0.1, event("x")), (0.2, event(usage=USAGE_3))], 3, "without [DONE]"),
        (
            [(0.1, event("x")), (0.2, event(usage={**USAGE_3, "completion_tokens": 1})), (0.3, DONE)],
            3,
            "truncated stream: output_tokens=1 < expected=3",
        ),
        ([(0.1, DONE)], 3, "empty stream"),
        ([(0.1, b"data: {not json\n\n")], 3, "malformed stream event"),
        ([(0.1, event("x")), (0.2, b'data: {"error": {"message": "boom"}}\n\n'), (0.3, DONE)], 1, "server error"),
    ],
)
def test_bad_streams_fail_with_a_reason(timed, expected, reason):
    reader = StreamReader(start=0.0)
    feed_all(reader, timed)
    result = reader.finish(1.0, expected_tokens=expected)
    assert result.error is not None and reason in result.error


def test_transport_error_wins_and_times_stop_at_the_failure():
    reader = StreamReader(start=0.0)
    feed_all(reader, [(0.1, event("x"))])
    result = reader.finish(5.0, expected_tokens=3, error="stall: no data within --stall-timeout=1 s")
    assert result.error.startswith("stall") and result.e2e_s == pytest.approx(5.0)
