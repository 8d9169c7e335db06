"""The load-test report: one JSON document, a per-prompt CSV, a per-request CSV and a Markdown table.

``build_report`` is pure (samples in, dict out); ``write_report`` puts it on disk with the figures of ``plots``.
Latencies are in ms, throughputs in tokens/s, as in the contest's ``prompt_data_*.csv``.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from .metrics import (
    MS_PER_S,
    PERCENTILE_METHOD,
    Sample,
    accuracy_against,
    by_concurrency,
    contest_score,
    contest_throughput,
    output_throughput,
    summarize,
)
from .workload import Baseline, Prompt

SCHEMA = "vllm-nki-moe/loadtest-report/1"
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
REQUESTS_CSV = "requests.csv"
MAC_RATIO_NOTE = "not observable over HTTP: reported as given by --nki-mac-ratio"
ACCURACY_NOTE = (
    "generated text equal to the reference report's, for every successful timed run; without a "
    "reference accuracy is null and the score takes it as 1, as the contest harness did on trn2; against the trn3 "
    "baseline (where the harness checks logits against NxDI's) no reference means no score: accuracy unverified"
)
# Baselines whose harness gates the score on accuracy (trn3: logits compared with the NxDI baseline on the device,
# research/contest.md): there a missing reference is "unverified", never accuracy 1.
ACCURACY_GATED_BASELINES = ("trn3", "prompt_data_trn3.csv")

CSV_COLUMNS = (
    "id",
    "name",
    "prompt_tokens",
    "output_tokens",
    "runs",
    "runs_ok",
    "failures",
    "e2e_p50_ms",
    "e2e_p90_ms",
    "e2e_p99_ms",
    "e2e_mean_ms",
    "throughput_tok_s",
    "output_tok_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_mean_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "accuracy",
    "base_p99_ms",
    "base_throughput_tok_s",
    "reduced_latency",
    "increased_throughput",
    "score",
)
REQUEST_COLUMNS = (
    "prompt_id",
    "ok",
    "started_at_s",
    "users",
    "e2e_ms",
    "ttft_ms",
    "tpot_ms",
    "prompt_tokens",
    "output_tokens",
    "error",
)


def build_report(
    *,
    prompts: Sequence[Prompt],
    samples: Sequence[Sample],
    run: Mapping,
    prompt_tokens: Mapping[int, int],
    requested_tokens: Mapping[int, int],
    baselines: Mapping[int, Baseline],
    references: Mapping[int, tuple[str, str]],
    mac_ratio: float,
    setup_errors: Mapping[int, str] | None = None,
    mac_ratio_note: str = MAC_RATIO_NOTE,
) -> dict:
    """Assemble the report. ``samples`` are the timed requests (warm-ups excluded); ``run`` is metadata copied into
    ``report["run"]``; ``setup_errors`` maps a prompt id to why it never ran (e.g. longer than ``--seq-len``)."""
    setup_errors = setup_errors or {}
    contest = run.get("mode", "contest") == "contest"
    accuracy_gated = str(run.get("baseline") or "").endswith(ACCURACY_GATED_BASELINES)
    entries = []
    for prompt in prompts:
        mine = [s for s in samples if s.prompt_id == prompt.id]
        entries.append(
            _prompt_entry(
                prompt,
                mine,
                contest=contest,
                accuracy_gated=accuracy_gated,
                prompt_tokens=prompt_tokens.get(prompt.id),
                requested=requested_tokens.get(prompt.id),
                baseline=baselines.get(prompt.id),
                reference=references.get(prompt.id),
                mac_ratio=mac_ratio,
                setup_error=setup_errors.get(prompt.id),
            )
        )
    ok = [s for s in samples if s.ok]
    scored = [e["score"] for e in entries if e["score"] is not None]
    failures = Counter((s.prompt_id, s.error) for s in samples if not s.ok)
    complete = bool(entries) and len(scored) == len(entries)
    totals = {
        "prompts": len(entries),
        "prompts_scored": len(scored),
        # the contest's total is over every prompt: a sum over fewer is reported apart, as partial, never as the score
        "score": sum(scored) if complete else None,
        "score_partial": sum(scored) if scored and not complete else None,
        "requests": len(samples),
        "requests_ok": len(ok),
        "failures": len(samples) - len(ok),
        "output_tokens": sum(s.output_tokens for s in ok),
        "e2e_ms": summarize(s.e2e_s for s in ok),
        "ttft_ms": summarize(s.ttft_s for s in ok if s.ttft_s is not None),
        "tpot_ms": summarize(s.tpot_s for s in ok if s.tpot_s is not None),
        "itl_ms": summarize(g for s in ok for g in s.itl_s),
    }
    if ok:
        span = max(s.started_at + s.e2e_s for s in ok) - min(s.started_at for s in ok)
        totals["wall_s"] = span
        totals["output_tok_s_aggregate"] = totals["output_tokens"] / span if span > 0 else None
    return {
        "schema": SCHEMA,
        "run": {
            **run,
            "nki_mac_ratio": mac_ratio,
            "nki_mac_ratio_note": mac_ratio_note or MAC_RATIO_NOTE,
            "percentile_method": PERCENTILE_METHOD,
            "accuracy_note": ACCURACY_NOTE,
        },
        "prompts": entries,
        "totals": totals,
        "failures": [
            {"prompt_id": pid, "error": err, "count": n}
            for (pid, err), n in sorted(failures.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
        ],
        "concurrency": [vars(p) for p in by_concurrency(samples)] if not contest else [],
    }


def _prompt_entry(
    prompt: Prompt,
    samples: list[Sample],
    *,
    contest: bool,
    accuracy_gated: bool = False,
    prompt_tokens: int | None,
    requested: int | None,
    baseline: Baseline | None,
    reference: tuple[str, str] | None,
    mac_ratio: float,
    setup_error: str | None,
) -> dict:
    ok = [s for s in samples if s.ok]
    notes = [setup_error] if setup_error else []
    usage_prompt = max((s.prompt_tokens for s in ok), default=0)
    if usage_prompt and prompt_tokens and usage_prompt != prompt_tokens:
        notes.append(f"server usage says prompt_tokens={usage_prompt}, /tokenize said {prompt_tokens}")
    texts = [s.text for s in ok]
    ref_text = None
    if reference is not None:
        ref_prompt, ref_text = reference
        if ref_prompt and ref_prompt != prompt.text:
            notes.append("reference ignored: its prompt text differs from this prompt")
            ref_text = None
    accuracy = accuracy_against(texts, ref_text)
    e2e = summarize(s.e2e_s for s in ok)
    throughput = contest_throughput(ok)
    entry = {
        "id": prompt.id,
        "name": prompt.name,
        "prompt": prompt.text,
        "prompt_tokens": usage_prompt or prompt_tokens,
        "output_tokens_requested": requested,
        "output_tokens": round(sum(s.output_tokens for s in ok) / len(ok)) if ok else None,
        "runs": len(samples),
        "runs_ok": len(ok),
        "failures": len(samples) - len(ok),
        "e2e_ms": e2e,
        "throughput_tok_s": throughput,
        "output_tok_s": output_throughput(ok),
        "ttft_ms": summarize(s.ttft_s for s in ok if s.ttft_s is not None),
        "tpot_ms": summarize(s.tpot_s for s in ok if s.tpot_s is not None),
        "itl_ms": summarize(g for s in ok for g in s.itl_s),
        "accuracy": accuracy,
        "accuracy_checked": accuracy is not None,
        "runs_matching_reference": sum(t == ref_text for t in texts) if ref_text is not None else None,
        "self_consistent": len(set(texts)) <= 1 if texts else None,
        "baseline": vars(baseline) if baseline else None,
        "reduced_latency": None,
        "increased_throughput": None,
        "score": None,
        "notes": notes,
        "generated_text": texts[0] if texts else None,
    }
    if (
        baseline
        and baseline.prompt_tokens
        and entry["prompt_tokens"]
        and baseline.prompt_tokens != entry["prompt_tokens"]
    ):
        notes.append(
            f"baseline prompt_tokens={baseline.prompt_tokens} differs from ours={entry['prompt_tokens']}: "
            "another tokenizer or prompt, so the ratios compare different work"
        )
    if samples and not ok:
        notes.append("no successful timed run")
    elif len(ok) < len(samples):
        notes.append(f"{len(samples) - len(ok)} of {len(samples)} timed runs failed")
    if baseline is None:
        notes.append("no baseline: score is null")
    elif not contest:
        notes.append("load mode: the contest score is defined for batch 1 (contest mode) only")
    elif not ok or len(ok) < len(samples):
        notes.append("score is null: a prompt with failed runs gets none (the contest harness would crash)")
    elif accuracy is None and accuracy_gated:
        notes.append(
            "score is null: accuracy unverified (the trn3 harness compares logits with NxDI's baseline; pass "
            "--reference with a report of the baseline's outputs)"
        )
    else:
        entry["reduced_latency"] = baseline.p99_ms / e2e["p99"]
        entry["increased_throughput"] = throughput / baseline.throughput_tok_s
        entry["score"] = contest_score(
            accuracy=1.0 if accuracy is None else accuracy,
            p99_ms=e2e["p99"],
            throughput=throughput,
            base_p99_ms=baseline.p99_ms,
            base_throughput=baseline.throughput_tok_s,
            mac_ratio=mac_ratio,
        )
    return entry


def csv_row(entry: Mapping) -> dict:
    """One prompt entry flattened to the CSV columns."""

    def get(key: str, stat: str):
        return (entry.get(key) or {}).get(stat)

    base = entry.get("baseline") or {}
    return {
        "id": entry["id"],
        "name": entry["name"],
        "prompt_tokens": entry["prompt_tokens"],
        "output_tokens": entry["output_tokens"],
        "runs": entry["runs"],
        "runs_ok": entry["runs_ok"],
        "failures": entry["failures"],
        "e2e_p50_ms": get("e2e_ms", "p50"),
        "e2e_p90_ms": get("e2e_ms", "p90"),
        "e2e_p99_ms": get("e2e_ms", "p99"),
        "e2e_mean_ms": get("e2e_ms", "mean"),
        "throughput_tok_s": entry["throughput_tok_s"],
        "output_tok_s": entry["output_tok_s"],
        "ttft_p50_ms": get("ttft_ms", "p50"),
        "ttft_p99_ms": get("ttft_ms", "p99"),
        "tpot_mean_ms": get("tpot_ms", "mean"),
        "itl_p50_ms": get("itl_ms", "p50"),
        "itl_p99_ms": get("itl_ms", "p99"),
        "accuracy": entry["accuracy"],
        "base_p99_ms": base.get("p99_ms"),
        "base_throughput_tok_s": base.get("throughput_tok_s"),
        "reduced_latency": entry["reduced_latency"],
        "increased_throughput": entry["increased_throughput"],
        "score": entry["score"],
    }


def write_report(report: Mapping, samples: Sequence[Sample], out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``report.json``, ``report.csv`` (a row per prompt and a TOTAL row), ``requests.csv`` and, unless
    ``plots`` is False, the PNG figures. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / REPORT_JSON, out / REPORT_CSV, out / REQUESTS_CSV]
    written[0].write_text(json.dumps(report, indent=2, default=_json_default) + "\n", encoding="utf-8")
    with written[1].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for entry in report["prompts"]:
            writer.writerow(csv_row(entry))
        totals = report["totals"]
        writer.writerow(
            {
                "id": "TOTAL",
                "name": ""
                if totals["score_partial"] is None
                else f"partial: {totals['prompts_scored']} of {totals['prompts']} prompts scored, sum "
                f"{totals['score_partial']:.6g} (not a contest total)",
                "runs": totals["requests"],
                "runs_ok": totals["requests_ok"],
                "failures": totals["failures"],
                "score": totals["score"],
            }
        )
    with written[2].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(REQUEST_COLUMNS)
        for s in samples:
            writer.writerow(
                [
                    s.prompt_id,
                    int(s.ok),
                    f"{s.started_at:.4f}",
                    s.users,
                    _ms(s.e2e_s),
                    _ms(s.ttft_s),
                    _ms(s.tpot_s),
                    s.prompt_tokens,
                    s.output_tokens,
                    s.error or "",
                ]
            )
    if plots:
        from .plots import write_plots  # matplotlib is imported only when figures are wanted

        written += write_plots(report, samples, out)
    return written


def format_table(report: Mapping) -> str:
    """A Markdown table of the per-prompt figures and the total score, for logs and issue notes."""
    head = (
        "| id | name | prompt tok | out tok | ok/runs | p50 ms | p99 ms | base p99 ms | tok/s | base tok/s "
        "| TTFT p50 ms | TPOT ms | accuracy | score |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in report["prompts"]:
        base = e.get("baseline") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    str(e["id"]),
                    e["name"],
                    _fmt(e["prompt_tokens"]),
                    _fmt(e["output_tokens"]),
                    f"{e['runs_ok']}/{e['runs']}",
                    _fmt((e["e2e_ms"] or {}).get("p50")),
                    _fmt((e["e2e_ms"] or {}).get("p99")),
                    _fmt(base.get("p99_ms")),
                    _fmt(e["throughput_tok_s"]),
                    _fmt(base.get("throughput_tok_s")),
                    _fmt((e["ttft_ms"] or {}).get("p50")),
                    _fmt((e["tpot_ms"] or {}).get("mean")),
                    _fmt(e["accuracy"]),
                    _fmt(e["score"], 3),
                ]
            )
            + " |"
        )
    t = report["totals"]
    if t.get("score_partial") is not None:
        total = f"none (partial sum {_fmt(t['score_partial'], 3)}, not a contest total)"
    else:
        total = _fmt(t["score"], 3)
    lines.append(
        f"\ntotal score: {total} over {t['prompts_scored']}/{t['prompts']} prompts scored; "
        f"requests {t['requests_ok']}/{t['requests']} ok, {t['failures']} failed"
    )
    return "\n".join(lines)


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * MS_PER_S:.3f}"


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"report: value of type {type(value).__name__} is not JSON-serialisable")
