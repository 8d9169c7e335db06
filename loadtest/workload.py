"""What a load test sends and what it is compared to: prompt files, contest baselines, accuracy references.

Prompt files follow the contest harness (``aws-neuron/nki-moe:test.py``, ``parse_prompts``): the file is split on
``"\\n\\n"``, each piece is stripped, empty pieces are dropped, and nothing is unescaped (the public prompts contain
literal ``\\"`` sequences, which are part of the tokenized input). Prompt ids are positions in the file, as in the
contest, where ``prompt_data_*.csv`` row ``Prompt ID`` = i scores prompt i.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
CONTEST_PROMPTS = DATA_DIR / "prompts.txt"
CONTEST_BASELINES = {"trn2": DATA_DIR / "prompt_data_trn2.csv", "trn3": DATA_DIR / "prompt_data_trn3.csv"}

# Short names for the 5 public contest prompts, in file order (research/contest.md, section 1.4).
CONTEST_PROMPT_NAMES = ("Twelve Days", "Palindrome", "Seating", "Quote", "Haystack")
NAME_WORDS = 4  # a prompt outside the contest set is named after its first words
NAME_CHARS = 32


@dataclass(frozen=True)
class Prompt:
    """One prompt of a workload: ``id`` is its position in the prompt file, ``text`` is sent as-is."""

    id: int
    name: str
    text: str


@dataclass(frozen=True)
class Baseline:
    """The figures a prompt's score divides by: p99 end-to-end latency (ms) and contest throughput (tokens/s).

    ``prompt_tokens`` is the baseline's own prompt length when known (the CSV's ``Context Length``), so a report can
    say when a baseline was measured on a different tokenization; ``source`` names the file it came from.
    """

    p99_ms: float
    throughput_tok_s: float
    prompt_tokens: int | None
    source: str


def split_prompts(text: str) -> list[str]:
    """Split a prompt file's text exactly as the contest harness does: on blank lines, each piece stripped."""
    return [piece.strip() for piece in text.split("\n\n") if piece.strip()]


def prompt_name(index: int, text: str, *, contest: bool) -> str:
    """A short human name: the contest's for the public prompts, else the first few words of the text."""
    if contest and index < len(CONTEST_PROMPT_NAMES):
        return CONTEST_PROMPT_NAMES[index]
    words = re.sub(r"\s+", " ", text).split(" ")[:NAME_WORDS]
    name = " ".join(words)
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."


def load_prompts(path: str | Path | None = None) -> list[Prompt]:
    """Read a prompt file (default: the 5 public contest prompts). Raises ``ValueError`` on an empty file."""
    path = Path(path) if path else CONTEST_PROMPTS
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    pieces = split_prompts(text)
    if not pieces:
        raise ValueError(f"load_prompts: prompts=0 in {path}; a prompt file holds prompts separated by blank lines")
    contest = raw == CONTEST_PROMPTS.read_bytes()
    return [Prompt(i, prompt_name(i, piece, contest=contest), piece) for i, piece in enumerate(pieces)]


def load_baseline(path: str | Path) -> dict[int, Baseline]:
    """Baselines by prompt id, from a contest ``prompt_data_*.csv`` or from an earlier report JSON of ours.

    Contest CSV columns: ``Prompt ID, Context Length, Sequence Length, Base latency, Base throughput`` with latency the
    p99 end-to-end latency in ms and throughput ``seq_len / mean latency`` in tokens/s (the ``Sequence Length`` column
    is unused by the harness, which runs every prompt at ``--seq-len 640``). ``trn2`` and ``trn3`` name the shipped
    tables. A report JSON contributes each prompt's ``e2e_ms.p99`` and ``throughput_tok_s``.
    """
    path = CONTEST_BASELINES.get(str(path), path)
    path = Path(path)
    if path.suffix.lower() == ".json":
        return _baseline_from_report(path)
    return _baseline_from_csv(path)


def _baseline_from_csv(path: Path) -> dict[int, Baseline]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, skipinitialspace=True))
    if not rows or [c.strip().lower() for c in rows[0]][:1] != ["prompt id"]:
        raise ValueError(
            f"load_baseline: header={rows[0] if rows else None!r} in {path}; expected the contest CSV "
            "columns 'Prompt ID, Context Length, Sequence Length, Base latency, Base throughput'"
        )
    out = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < 5:
            raise ValueError(f"load_baseline: columns={len(row)} at {path}:{line}; the contest CSV has 5")
        pid, ctx, _seq, latency, throughput = row[:5]
        out[int(pid)] = Baseline(float(latency), float(throughput), int(ctx), str(path))
    return out


def _baseline_from_report(path: Path) -> dict[int, Baseline]:
    out = {}
    for entry in load_report(path)["prompts"]:
        p99 = (entry.get("e2e_ms") or {}).get("p99")
        thr = entry.get("throughput_tok_s")
        if p99 and thr:
            out[int(entry["id"])] = Baseline(float(p99), float(thr), entry.get("prompt_tokens"), str(path))
    return out


def load_report(path: str | Path) -> dict:
    """Read an earlier report JSON of ours; raises ``ValueError`` when it has no ``prompts`` list."""
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(report, dict) or not isinstance(report.get("prompts"), list):
        raise ValueError(f"load_report: prompts=missing in {path}; a report JSON has a top-level 'prompts' list")
    return report


def load_reference(path: str | Path) -> dict[int, tuple[str, str]]:
    """Accuracy references by prompt id: ``(prompt text, generated text)`` from an earlier report JSON.

    The prompt text is kept so that a reference taken on a different prompt file is never applied by id alone.
    """
    out = {}
    for entry in load_report(path)["prompts"]:
        if entry.get("generated_text") is not None:
            out[int(entry["id"])] = (entry.get("prompt", ""), entry["generated_text"])
    return out
