"""PNG figures of a load-test report (matplotlib, Agg backend: no display needed).

- ``latency_vs_baseline.png``: per prompt, our p50/p99 end-to-end latency beside the baseline's p99, and our contest
  throughput beside the baseline's; log scale when they differ by more than ``LOG_SCALE_RATIO``;
- ``ttft_itl.png``: the distribution of time to first token per prompt, and of inter-token latency;
- ``e2e_runs.png``: end-to-end latency of each timed run in order, per prompt (drift, warm-up left-overs, outliers);
- ``throughput_vs_concurrency.png`` (load mode): aggregate output tokens/s and median latencies per user count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from .metrics import MS_PER_S, Sample  # noqa: E402

LOG_SCALE_RATIO = 20.0  # beyond this max/min ratio a linear axis squashes the smaller bars to nothing
ITL_FLOOR_MS = 0.01  # gaps below this (several chunks in one socket read) are drawn at it on a log axis
HIST_BINS = 60
HEADROOM_LINEAR, HEADROOM_LOG = 1.3, 6.0  # room above the tallest bar for its label and the legend
DPI = 110
WIDE = (12, 5)
OURS, OURS_LIGHT, BASE = "#1f77b4", "#9ecae1", "#ff7f0e"


def write_plots(report: Mapping, samples: Sequence[Sample], out_dir: str | Path) -> list[Path]:
    """Write every figure that has data; returns the paths written."""
    out = Path(out_dir)
    written = [_latency_vs_baseline(report, out / "latency_vs_baseline.png")]
    ok = [s for s in samples if s.ok]
    if ok:
        written.append(_ttft_itl(report, ok, out / "ttft_itl.png"))
        written.append(_e2e_runs(report, ok, out / "e2e_runs.png"))
    if report.get("concurrency"):
        written.append(_throughput_vs_concurrency(report, out / "throughput_vs_concurrency.png"))
    return written


def _labels(report: Mapping) -> list[str]:
    return [f"{e['id']}: {e['name']}" for e in report["prompts"]]


def _maybe_log(ax, values: Sequence[float | None]) -> None:
    """Log scale when the bars differ by more than LOG_SCALE_RATIO; headroom above the tallest for the legend."""
    present = [v for v in values if v]
    if not present:
        return
    if max(present) / min(present) > LOG_SCALE_RATIO:
        ax.set_yscale("log")
        ax.set_ylim(top=max(present) * HEADROOM_LOG)
    else:
        ax.set_ylim(top=max(present) * HEADROOM_LINEAR)


def _annotate(ax, bars, fmt: str = "{:.0f}") -> None:
    for bar in bars:
        height = bar.get_height()
        if height:
            ax.annotate(
                fmt.format(height),
                (bar.get_x() + bar.get_width() / 2, height),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )


def _latency_vs_baseline(report: Mapping, path: Path) -> Path:
    entries = report["prompts"]
    x = range(len(entries))
    p50 = [(e["e2e_ms"] or {}).get("p50") or 0 for e in entries]
    p99 = [(e["e2e_ms"] or {}).get("p99") or 0 for e in entries]
    base = [(e["baseline"] or {}).get("p99_ms") or 0 for e in entries]
    thr = [e["throughput_tok_s"] or 0 for e in entries]
    base_thr = [(e["baseline"] or {}).get("throughput_tok_s") or 0 for e in entries]
    has_base = any(base)
    fig, (left, right) = plt.subplots(1, 2, figsize=WIDE)
    width = 0.27 if has_base else 0.4
    _annotate(
        left,
        left.bar(
            [i - width for i in x] if has_base else [i - width / 2 for i in x],
            p50,
            width,
            label="ours p50",
            color=OURS_LIGHT,
        ),
    )
    _annotate(
        left,
        left.bar(
            [i for i in x] if has_base else [i + width / 2 for i in x],
            p99,
            width,
            label="ours p99 (scored)",
            color=OURS,
        ),
    )
    if has_base:
        _annotate(left, left.bar([i + width for i in x], base, width, label="baseline p99", color=BASE, hatch="//"))
    left.set_ylabel("end-to-end latency per request (ms)")
    left.set_title("Latency: lower is better")
    _maybe_log(left, p50 + p99 + base)
    width = 0.4 if has_base else 0.6
    _annotate(
        right, right.bar([i - width / 2 for i in x] if has_base else list(x), thr, width, label="ours", color=OURS)
    )
    if has_base:
        _annotate(
            right, right.bar([i + width / 2 for i in x], base_thr, width, label="baseline", color=BASE, hatch="//")
        )
    right.set_ylabel("(prompt + generated tokens) / mean E2E (tokens/s)")
    right.set_title("Contest throughput: higher is better")
    _maybe_log(right, thr + base_thr)
    for ax in (left, right):
        ax.set_xticks(list(x), _labels(report), rotation=20, ha="right", fontsize=8)
        ax.legend(fontsize=8, loc="upper center", ncol=3)
        ax.grid(axis="y", alpha=0.3)
    run, totals = report["run"], report["totals"]
    score, partial = totals.get("score"), totals.get("score_partial")
    if score is not None:
        scored = f": total score {score:.3f}"
    elif partial is not None:
        scored = f": partial sum {partial:.3f} over {totals['prompts_scored']}/{totals['prompts']} prompts, no total"
    else:
        scored = ": no score"
    fig.suptitle(
        f"{run.get('model', '?')} at {run.get('host', '?')}, mode {run.get('mode')}, seq_len "
        f"{run.get('seq_len')}, {run.get('runs_per_prompt')} runs/prompt" + scored,
        fontsize=10,
    )
    return _save(fig, path)


def _ttft_itl(report: Mapping, ok: Sequence[Sample], path: Path) -> Path:
    entries = report["prompts"]
    fig, (left, right) = plt.subplots(1, 2, figsize=WIDE)
    ttfts = [[s.ttft_s * MS_PER_S for s in ok if s.prompt_id == e["id"] and s.ttft_s is not None] for e in entries]
    keep = [i for i, t in enumerate(ttfts) if t]
    if keep:
        left.boxplot([ttfts[i] for i in keep], positions=list(range(len(keep))), widths=0.5, showfliers=False)
        for pos, i in enumerate(keep):
            left.scatter([pos] * len(ttfts[i]), ttfts[i], s=10, alpha=0.5, color=OURS, zorder=3)
        left.set_xticks(range(len(keep)), [_labels(report)[i] for i in keep], rotation=20, ha="right", fontsize=8)
    left.set_ylabel("time to first token (ms)")
    left.set_ylim(bottom=0)
    left.set_title("TTFT per prompt (prefill + queueing + HTTP)")
    left.grid(axis="y", alpha=0.3)
    gaps = [g * MS_PER_S for s in ok for g in s.itl_s]
    if gaps:
        low, high = max(min(gaps), ITL_FLOOR_MS), max(max(gaps), ITL_FLOOR_MS * 2)
        if high / low > LOG_SCALE_RATIO:  # bursts and stalls side by side: only a log axis shows both
            gaps = [max(g, ITL_FLOOR_MS) for g in gaps]
            right.hist(gaps, bins=np.geomspace(low, high, HIST_BINS), color=OURS, alpha=0.8)
            right.set_xscale("log")
        else:
            right.hist(gaps, bins=HIST_BINS, color=OURS, alpha=0.8)
        gap_stats = report["totals"]["itl_ms"]
        for key, style in (("p50", "-"), ("p99", "--")):
            right.axvline(gap_stats[key], color="black", linestyle=style, label=f"{key} = {gap_stats[key]:.2f} ms")
        right.legend(fontsize=8)
        right.set_yscale("log")
    right.set_xlabel(f"gap between text chunks (ms); gaps < {ITL_FLOOR_MS} ms = chunks read together")
    right.set_ylabel("count (log)")
    right.set_title("Inter-token latency, all prompts (one decode step + transport)")
    right.grid(alpha=0.3)
    return _save(fig, path)


def _e2e_runs(report: Mapping, ok: Sequence[Sample], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(WIDE[0], 4.5))
    for entry, label in zip(report["prompts"], _labels(report)):
        e2e = [s.e2e_s * MS_PER_S for s in ok if s.prompt_id == entry["id"]]
        if e2e:
            ax.plot(range(1, len(e2e) + 1), e2e, marker="o", markersize=3, label=label)
    ax.set_xlabel("timed run (in order of completion)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("End-to-end latency of every timed run, in order: a stable server draws flat lines")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def _throughput_vs_concurrency(report: Mapping, path: Path) -> Path:
    points = report["concurrency"]
    users = [p["users"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=WIDE)
    left.plot(users, [p["output_tok_s"] for p in points], marker="o", color=OURS)
    for p in points:
        left.annotate(
            f"{p['requests']} req",
            (p["users"], p["output_tok_s"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    left.set_xlabel("concurrent users")
    left.set_ylabel("aggregate generated tokens/s")
    left.set_title("Throughput vs concurrency: higher is better")
    right.plot(users, [p["e2e_p50_ms"] for p in points], marker="o", color=OURS, label="E2E p50")
    right.plot(users, [p["ttft_p50_ms"] or 0 for p in points], marker="s", color=BASE, label="TTFT p50")
    right.set_xlabel("concurrent users")
    right.set_ylabel("latency (ms)")
    right.set_title("Latency vs concurrency: lower is better")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.set_xticks(users)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
