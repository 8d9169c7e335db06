"""Statistics and the contest score, on plain lists of samples (no locust, no numpy).

Definitions follow the contest's scoring code (research/contest.md, sections 1.3 and 4):

- latency is the end-to-end time of one request; the score uses its **p99 over the timed runs, in ms**;
- percentiles use NumPy's default method (``np.percentile(..., method="linear")``), as NxDI's ``generate_report``
  does: rank ``q/100 * (n-1)`` on the sorted samples, linear between neighbours. With 20 runs the p99 is
  ``s[18] + 0.81 * (s[19] - s[18])``, almost the maximum;
- contest throughput is ``(prompt + generated tokens) / mean E2E`` in tokens/s (the harness's
  ``n_runs * seq_len / sum(latencies)``), summed over runs so that it stays right if token counts vary;
- ``score = accuracy * (base_p99 / p99) * (throughput / base_throughput) * (1 + nki_mac_ratio)``, summed over prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)
PERCENTILE_METHOD = "linear (numpy default, as NxDI generate_report)"
MS_PER_S = 1000.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values`` by NumPy's default linear method. Raises on an empty sequence."""
    if not values:
        raise ValueError("percentile: values=[]; need at least one sample")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q={q}; must lie in [0, 100]")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def summarize(values_s: Iterable[float]) -> dict | None:
    """Summary in ms of durations given in seconds: count, mean, p50, p90, p99, min, max; None when empty."""
    ms = [v * MS_PER_S for v in values_s]
    if not ms:
        return None
    out = {"count": len(ms), "mean": sum(ms) / len(ms)}
    out.update({f"p{q}": percentile(ms, q) for q in PERCENTILES})
    out.update({"min": min(ms), "max": max(ms)})
    return out


@dataclass
class Sample:
    """One timed request as the locustfile recorded it; times in seconds (perf_counter deltas)."""

    prompt_id: int
    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""
    error: str | None = None
    started_at: float = 0.0  # wall-clock seconds since the test started
    users: int = 1  # locust users running when the request started


def contest_throughput(samples: Sequence[Sample]) -> float | None:
    """(prompt + generated tokens) / mean E2E over successful samples, in tokens/s."""
    ok = [s for s in samples if s.ok]
    total = sum(s.e2e_s for s in ok)
    return sum(s.prompt_tokens + s.output_tokens for s in ok) / total if ok and total > 0 else None


def output_throughput(samples: Sequence[Sample]) -> float | None:
    """Generated tokens / mean E2E over successful samples, in tokens/s (what the contest README calls throughput)."""
    ok = [s for s in samples if s.ok]
    total = sum(s.e2e_s for s in ok)
    return sum(s.output_tokens for s in ok) / total if ok and total > 0 else None


def contest_score(
    *, accuracy: float, p99_ms: float, throughput: float, base_p99_ms: float, base_throughput: float, mac_ratio: float
) -> float:
    """``accuracy * (base_p99 / p99) * (throughput / base_throughput) * (1 + mac_ratio)``, as the contest's
    ``calculate_score``. Latencies in ms, throughputs in tokens/s; raises on non-positive inputs."""
    for name, value in (
        ("p99_ms", p99_ms),
        ("throughput", throughput),
        ("base_p99_ms", base_p99_ms),
        ("base_throughput", base_throughput),
    ):
        if not value > 0:
            raise ValueError(f"contest_score: {name}={value}; must be > 0")
    if not 0 <= mac_ratio <= 1:
        raise ValueError(f"contest_score: mac_ratio={mac_ratio}; the NKI MAC ratio lies in [0, 1]")
    return accuracy * (base_p99_ms / p99_ms) * (throughput / base_throughput) * (1 + mac_ratio)


def accuracy_against(texts: Sequence[str], reference: str | None) -> float | None:
    """1.0 when every generated text equals the reference, 0.0 when any differs, None without a reference or text."""
    if reference is None or not texts:
        return None
    return 1.0 if all(t == reference for t in texts) else 0.0


@dataclass(frozen=True)
class ConcurrencyPoint:
    """Aggregate behaviour of the requests started while ``users`` locust users were running."""

    users: int
    requests: int
    output_tok_s: float  # generated tokens / wall time spanned by those requests
    requests_per_s: float
    e2e_p50_ms: float
    ttft_p50_ms: float | None


def by_concurrency(samples: Sequence[Sample]) -> list[ConcurrencyPoint]:
    """Group successful samples by the user count at their start; aggregate throughput per group.

    The wall time of a group runs from its first request's start to its last request's end, so a group is only
    meaningful when the user count stayed there long enough for several requests (a slow ``--spawn-rate``).
    """
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        if s.ok:
            groups.setdefault(s.users, []).append(s)
    points = []
    for users, group in sorted(groups.items()):
        span = max(s.started_at + s.e2e_s for s in group) - min(s.started_at for s in group)
        if span <= 0:
            continue
        ttfts = [s.ttft_s * MS_PER_S for s in group if s.ttft_s is not None]
        points.append(
            ConcurrencyPoint(
                users=users,
                requests=len(group),
                output_tok_s=sum(s.output_tokens for s in group) / span,
                requests_per_s=len(group) / span,
                e2e_p50_ms=percentile([s.e2e_s * MS_PER_S for s in group], 50),
                ttft_p50_ms=percentile(ttfts, 50) if ttfts else None,
            )
        )
    return points
