"""``--nki-mac-ratio``: a number the user gives, or ``auto``: computed from the served model's config and kernels.

The ratio is not observable over HTTP. ``auto`` asks ``vllm-nki-moe mac-ratio --json`` (run as ``python -m
vllm_nki_moe.tools.cli`` in the interpreter running locust, so the load test keeps no import of the package) for the
checkpoint the server reports as the model's ``root`` in ``GET /v1/models`` (vLLM's model card), at the TP degree and
kernel backend given (``--mac-ratio-tp``, ``--mac-ratio-kernels``: the server does not expose them either).
"""

from __future__ import annotations

import json
import subprocess
import sys

AUTO = "auto"


def parse(text: str) -> float | str:
    """``auto`` or a ratio in [0, 1]; anything else is a ``ValueError`` naming the flag."""
    if str(text).strip().lower() == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"prompts.py: --nki-mac-ratio={text!r}; a number in [0, 1] or 'auto'") from None
    if not 0 <= value <= 1:
        raise ValueError(f"prompts.py: --nki-mac-ratio={value}; a MAC ratio lies in [0, 1]")
    return value


def compute(model_root: str, tp: int, kernels: str, python: str = sys.executable) -> tuple[float, str]:
    """(ratio, note) from ``vllm-nki-moe mac-ratio`` for ``model_root``; a ``ValueError`` saying why it cannot."""
    cmd = [python, "-m", "vllm_nki_moe.tools.cli", "mac-ratio", "--model", model_root, "--tp", str(tp)]
    cmd += ["--kernels", kernels, "--json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"prompts.py: --nki-mac-ratio auto: {' '.join(cmd[1:4])} did not run ({exc})") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = (proc.stdout + proc.stderr).strip().splitlines()
        raise ValueError(
            f"prompts.py: --nki-mac-ratio auto: vllm-nki-moe mac-ratio --model {model_root} failed "
            f"({why[-1] if why else f'exit {proc.returncode}'}); give the ratio as a number instead"
        )
    result = json.loads(lines[-1])
    note = (
        f"computed by vllm-nki-moe mac-ratio for {model_root} (TP {tp}, kernels {kernels}, prefill "
        f"{result['prefill_tokens']} tokens + decode batch {result['decode_batch']}, the contest harness's rule)"
    )
    return float(result["nki_mac_ratio"]), note
