"""One streamed ``/v1/completions`` response turned into client-side timings and token counts.

Definitions follow ``vllm bench serve`` (research/vllm.md, section 5.1), timed with ``time.perf_counter`` from just
before the request is sent:

- TTFT: arrival of the first ``data:`` event whose ``choices[0].text`` is non-empty;
- ITL:  gaps between consecutive events that carry text (one event may carry several tokens);
- E2E:  arrival of ``data: [DONE]`` (the end of the response: the contest times until ``generate()`` returns);
- TPOT: ``(E2E - TTFT) / (output_tokens - 1)``, undefined for a single output token.

Token counts come from the final usage event (``stream_options.include_usage``); without one, the count of text events
stands in and ``usage_reported`` is False. Nothing here does I/O: the caller feeds bytes with their arrival time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

DATA_PREFIX = b"data:"
DONE_PAYLOAD = b"[DONE]"


@dataclass
class StreamResult:
    """Everything measured on one streamed completion; ``error`` is None only for a complete, well-formed stream."""

    e2e_s: float
    ttft_s: float | None
    itl_s: list[float]
    text: str
    prompt_tokens: int | None
    output_tokens: int
    usage_reported: bool
    done: bool
    finish_reason: str | None
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, or None when it is undefined."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class StreamReader:
    """Incremental parser of a server-sent-events body. ``start`` is the perf_counter time the request was sent."""

    start: float
    _buffer: bytes = b""
    _first_text_at: float | None = None
    _last_text_at: float | None = None
    _done_at: float | None = None
    _itl: list[float] = field(default_factory=list)
    _text: list[str] = field(default_factory=list)
    _text_events: int = 0
    _usage: dict | None = None
    _finish_reason: str | None = None
    _error: str | None = None

    def feed(self, data: bytes, now: float) -> None:
        """Add bytes that arrived at ``now``; complete lines are parsed at once, a partial line waits for the rest."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line.strip(), now)

    @property
    def done(self) -> bool:
        return self._done_at is not None

    def _line(self, line: bytes, now: float) -> None:
        if not line.startswith(DATA_PREFIX) or self._error:
            return  # blank separators, ": keep-alive" comments, "event:" lines
        payload = line[len(DATA_PREFIX) :].strip()
        if payload == DONE_PAYLOAD:
            self._done_at = now
            return
        try:
            event = json.loads(payload)
        except ValueError:
            self._error = f"malformed stream event: {payload[:80]!r}"
            return
        if not isinstance(event, dict):
            self._error = f"malformed stream event: {payload[:80]!r}"
            return
        if "error" in event:  # vLLM reports errors raised mid-generation as a data event
            self._error = f"server error in stream: {str(event['error'])[:200]}"
            return
        if event.get("usage"):
            self._usage = event["usage"]
        for choice in event.get("choices") or []:
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
            text = choice.get("text") or ""
            if not text:
                continue
            if self._first_text_at is None:
                self._first_text_at = now
            else:
                self._itl.append(now - self._last_text_at)
            self._last_text_at = now
            self._text.append(text)
            self._text_events += 1

    def finish(self, now: float, *, expected_tokens: int | None = None, error: str | None = None) -> StreamResult:
        """Close the stream at ``now``. ``error`` is a transport error seen by the caller (it wins over ours).

        A stream is failed when it has a transport or server error, ends without ``[DONE]``, carries no text, or
        reports fewer output tokens than ``expected_tokens`` (the request's ``min_tokens``).
        """
        if self._buffer.strip():
            self._line(self._buffer.strip(), now)
            self._buffer = b""
        end = self._done_at if self._done_at is not None else now
        usage = self._usage or {}
        output_tokens = usage.get("completion_tokens")
        reported = isinstance(output_tokens, int)
        if not reported:
            output_tokens = self._text_events
        problem = error or self._error
        if problem is None and self._done_at is None:
            problem = "broken stream: ended without [DONE]"
        if problem is None and self._first_text_at is None:
            problem = "empty stream: no event carried text"
        if problem is None and expected_tokens is not None and output_tokens < expected_tokens:
            problem = f"truncated stream: output_tokens={output_tokens} < expected={expected_tokens}"
        return StreamResult(
            e2e_s=end - self.start,
            ttft_s=None if self._first_text_at is None else self._first_text_at - self.start,
            itl_s=list(self._itl),
            text="".join(self._text),
            prompt_tokens=usage.get("prompt_tokens"),
            output_tokens=output_tokens,
            usage_reported=reported,
            done=self._done_at is not None,
            finish_reason=self._finish_reason,
            error=problem,
        )
