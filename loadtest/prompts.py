"""Locustfile: the MLSys 2026 MoE contest's workload and score against any OpenAI-compatible server.

    locust -f loadtest/prompts.py --host http://127.0.0.1:8000 --headless -u 1 -r 1         # contest mode
    locust -f loadtest/prompts.py --host http://127.0.0.1:8000 --headless --mode load -u 8 -r 0.05 -t 10m

``contest`` mode (default) is the contest's protocol over HTTP: one user, the prompts in file order, for each prompt
``--warmup-runs`` untimed requests then ``--runs-per-prompt`` timed ones, each a streamed ``POST /v1/completions`` with
the raw prompt, greedy, ``max_tokens = min_tokens = seq_len - prompt_tokens`` and EOS ignored; a headless run quits by
itself when the runs are done. ``load`` mode runs every user in a loop over a mix of the prompts (user k starts at
prompt k), open-ended until locust's ``-t``, for latency and throughput under concurrency.

Each completion shows in locust's statistics as ``POST /v1/completions <id>:<name>`` with its real end-to-end time
(locust's own timing of a stream stops at the response headers), beside ``METRIC`` rows for TTFT, TPOT and the
largest inter-token gap of each request. HTTP errors, broken, stalled or truncated streams are locust failures with
a reason. When the test stops, the report (``report.json``, ``report.csv``, ``requests.csv``, PNG figures) is written
to ``--report-dir``. The statistics, score and report live in plain modules beside this file (see ``__init__``).
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import requests
from locust import User, constant, events, task
from locust.exception import StopUser
from locust.runners import LocalRunner

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # locust puts the locustfile's own folder on sys.path, not the repository's
    sys.path.insert(0, str(_ROOT))

from loadtest import mac_ratio  # noqa: E402
from loadtest.metrics import MS_PER_S, Sample  # noqa: E402
from loadtest.report import MAC_RATIO_NOTE, build_report, format_table, write_report  # noqa: E402
from loadtest.stream import StreamReader  # noqa: E402
from loadtest.workload import Baseline, Prompt, load_baseline, load_prompts, load_reference  # noqa: E402

log = logging.getLogger("loadtest")

MODES = ("contest", "load")
CONTEST_SEQ_LEN = 640  # prompt + generated tokens per request (nki-moe main.py --seq-len default)
CONTEST_RUNS = 20  # NxDI Benchmark(num_runs=20) in the contest harness
CONNECT_TIMEOUT_S = 10.0
READ_BYTES = 65536  # upper bound of one socket read; read1 returns whatever has arrived
ERROR_BODY_CHARS = 200  # of an HTTP error's body, kept in the failure reason
DEFAULT_REPORT_ROOT = Path("reports") / "loadtest"


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    """This locustfile's own options (they also show in the web UI's start form)."""
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="contest",
        help="contest: 1 user, prompts in order, warm-up + timed runs, then stop. "
        "load: every user loops over a mix of the prompts until -t",
    )
    parser.add_argument(
        "--prompt-file", default="", help="prompts separated by blank lines (default: the 5 public contest prompts)"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=CONTEST_SEQ_LEN,
        help="prompt + generated tokens per request; output length = seq-len - prompt tokens, "
        "prompt tokens counted by the server's own tokenizer",
    )
    parser.add_argument(
        "--runs-per-prompt", type=int, default=CONTEST_RUNS, help="timed runs per prompt in contest mode"
    )
    parser.add_argument("--warmup-runs", type=int, default=1, help="untimed runs per prompt before the timed ones")
    parser.add_argument(
        "--report-dir", default="", help="where the report goes (default: reports/loadtest/<mode>-<timestamp>)"
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="trn2, trn3 (the contest's baseline tables), a prompt_data_*.csv, or an earlier report.json of ours",
    )
    parser.add_argument(
        "--reference", default="", help="an earlier report.json whose generated text is the accuracy reference"
    )
    parser.add_argument(
        "--nki-mac-ratio",
        default="0",
        help="NKI MACs / all MACs of the served model, in [0, 1], reported as given; or 'auto': computed by "
        "vllm-nki-moe mac-ratio from the checkpoint GET /v1/models names (its 'root')",
    )
    parser.add_argument("--mac-ratio-tp", type=int, default=4, help="TP degree for --nki-mac-ratio auto (default 4)")
    parser.add_argument(
        "--mac-ratio-kernels",
        default="nki",
        choices=["nki", "torch"],
        help="kernel backend the server runs, for --nki-mac-ratio auto (default nki)",
    )
    parser.add_argument("--model", default="", help="served model name (default: the first of GET /v1/models)")
    parser.add_argument(
        "--api-key",
        default="",
        env_var="VLLM_API_KEY",
        is_secret=True,
        help="bearer token for servers started with an API key (default: $VLLM_API_KEY)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=900.0, help="seconds one completion may take in all before it fails"
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="seconds without a byte from the server before a completion fails as stalled",
    )


@dataclass
class RunState:
    """Everything one test run shares between its users and the report (reset at every test start)."""

    options: object = None
    host: str = ""
    model: str = ""
    prompts: list[Prompt] = field(default_factory=list)
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    requested: dict[int, int] = field(default_factory=dict)
    setup_errors: dict[int, str] = field(default_factory=dict)
    baselines: dict[int, Baseline] = field(default_factory=dict)
    references: dict[int, tuple[str, str]] = field(default_factory=dict)
    plan: list[tuple[Prompt, bool]] = field(default_factory=list)  # contest mode: (prompt, is_warmup), in order
    samples: list[Sample] = field(default_factory=list)
    mac_ratio: float = 0.0
    mac_ratio_note: str = ""
    fatal: str | None = None
    owner: object = None  # the contest-mode user that runs the plan
    started: float = 0.0  # time.time() at test start
    started_mono: float = 0.0  # time.perf_counter() at test start
    report_dir: Path | None = None
    user_ids: itertools.count = field(default_factory=itertools.count)

    @property
    def runnable(self) -> list[Prompt]:
        return [p for p in self.prompts if p.id in self.requested]


STATE = RunState()


def _fire(
    environment, request_type: str, name: str, response_time_ms: float, *, length: int = 0, error: str | None = None
) -> None:
    environment.events.request.fire(
        request_type=request_type,
        name=name,
        response_time=response_time_ms,
        response_length=length,
        exception=LoadTestFailure(error) if error else None,
        context={},
    )


class LoadTestFailure(Exception):
    """The reason a request failed, as locust's failure table shows it."""


def _validate(opts) -> None:
    if opts.seq_len < 2:
        raise ValueError(f"prompts.py: --seq-len={opts.seq_len}; must be >= 2 (a prompt token and an output token)")
    if opts.runs_per_prompt < 1:
        raise ValueError(f"prompts.py: --runs-per-prompt={opts.runs_per_prompt}; must be >= 1")
    if opts.warmup_runs < 0:
        raise ValueError(f"prompts.py: --warmup-runs={opts.warmup_runs}; must be >= 0")
    mac_ratio.parse(opts.nki_mac_ratio)
    if opts.request_timeout <= 0 or opts.stall_timeout <= 0:
        raise ValueError(
            f"prompts.py: --request-timeout={opts.request_timeout}, --stall-timeout="
            f"{opts.stall_timeout}; timeouts must be > 0"
        )


@events.test_start.add_listener
def on_test_start(environment, **_kwargs) -> None:
    """Read the inputs, ask the server for its model and token counts, and lay out the contest plan."""
    global STATE
    opts = environment.parsed_options
    STATE = state = RunState(
        options=opts, host=(environment.host or "").rstrip("/"), started=time.time(), started_mono=time.perf_counter()
    )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(state.started))
    state.report_dir = Path(opts.report_dir) if opts.report_dir else DEFAULT_REPORT_ROOT / f"{opts.mode}-{stamp}"
    if not isinstance(environment.runner, LocalRunner):
        log.warning(
            "prompts.py: runner=%s; reports are written by local (single-process) runs only",
            type(environment.runner).__name__,
        )
    try:
        _validate(opts)
        if not state.host:
            raise ValueError("prompts.py: --host=''; give the server's base URL, e.g. http://127.0.0.1:8000")
        state.prompts = load_prompts(opts.prompt_file or None)
        state.baselines = load_baseline(opts.baseline) if opts.baseline else {}
        state.references = load_reference(opts.reference) if opts.reference else {}
    except (OSError, ValueError) as exc:
        _abort(environment, str(exc))
        return
    with _session(opts) as session:
        state.model = opts.model or _first_model(environment, session, state)
        if state.fatal:
            _abort(environment, state.fatal)
            return
        try:
            state.mac_ratio, state.mac_ratio_note = _mac_ratio(session, state, opts)
        except ValueError as exc:
            _abort(environment, str(exc))
            return
        for prompt in state.prompts:
            _measure_prompt(environment, session, state, prompt, opts.seq_len)
    if not state.requested:
        _abort(environment, "prompts.py: no prompt can run: " + "; ".join(state.setup_errors.values()))
        return
    for prompt in state.runnable:
        state.plan += [(prompt, True)] * opts.warmup_runs + [(prompt, False)] * opts.runs_per_prompt
    log.info(
        "prompts.py: mode=%s model=%s prompts=%d seq_len=%d, report in %s",
        opts.mode,
        state.model,
        len(state.runnable),
        opts.seq_len,
        state.report_dir,
    )


def _session(opts) -> requests.Session:
    session = requests.Session()
    if opts is not None and opts.api_key:
        session.headers["Authorization"] = f"Bearer {opts.api_key}"
    return session


def _abort(environment, reason: str) -> None:
    STATE.fatal = reason
    log.error("%s", reason)
    environment.process_exit_code = 2
    gevent.spawn(environment.runner.quit)


def _first_model(environment, session: requests.Session, state: RunState) -> str:
    start = time.perf_counter()
    try:
        resp = session.get(f"{state.host}/v1/models", timeout=(CONNECT_TIMEOUT_S, state.options.stall_timeout))
        resp.raise_for_status()
        model = resp.json()["data"][0]["id"]
    except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as exc:
        state.fatal = f"prompts.py: GET /v1/models failed ({type(exc).__name__}: {exc}); pass --model or check --host"
        _fire(environment, "GET", "/v1/models", (time.perf_counter() - start) * MS_PER_S, error=state.fatal)
        return ""
    _fire(environment, "GET", "/v1/models", (time.perf_counter() - start) * MS_PER_S)
    return model


def _mac_ratio(session: requests.Session, state: RunState, opts) -> tuple[float, str]:
    given = mac_ratio.parse(opts.nki_mac_ratio)
    if given != mac_ratio.AUTO:
        return given, MAC_RATIO_NOTE
    try:
        resp = session.get(f"{state.host}/v1/models", timeout=(CONNECT_TIMEOUT_S, state.options.stall_timeout))
        resp.raise_for_status()
        cards = {card["id"]: card for card in resp.json()["data"]}
        root = cards[state.model].get("root") or ""
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"prompts.py: --nki-mac-ratio auto: GET /v1/models failed ({type(exc).__name__}: {exc})")
    if not root:
        raise ValueError(
            f"prompts.py: --nki-mac-ratio auto: GET /v1/models gives no 'root' (checkpoint) for {state.model!r}; "
            "give the ratio as a number"
        )
    return mac_ratio.compute(root, opts.mac_ratio_tp, opts.mac_ratio_kernels)


def _measure_prompt(environment, session: requests.Session, state: RunState, prompt: Prompt, seq_len: int) -> None:
    """Count the prompt's tokens with the server's tokenizer: ``POST /tokenize`` (vLLM), else the ``usage`` of a
    one-token completion (any OpenAI-compatible server); then fix its output length."""
    timeout = (CONNECT_TIMEOUT_S, state.options.stall_timeout)
    start = time.perf_counter()
    count, reason = None, None
    try:
        resp = session.post(
            f"{state.host}/tokenize", json={"model": state.model, "prompt": prompt.text}, timeout=timeout
        )
        if resp.status_code == 200:
            count = int(resp.json()["count"])
            _fire(environment, "POST", "/tokenize", (time.perf_counter() - start) * MS_PER_S)
    except (requests.RequestException, ValueError, KeyError, TypeError):
        pass
    if count is None:
        start = time.perf_counter()
        try:
            resp = session.post(
                f"{state.host}/v1/completions",
                timeout=timeout,
                json={"model": state.model, "prompt": prompt.text, "max_tokens": 1, "temperature": 0},
            )
            resp.raise_for_status()
            count = int(resp.json()["usage"]["prompt_tokens"])
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            reason = f"prompt {prompt.id}: token count failed ({type(exc).__name__})"
        _fire(
            environment, "POST", "/v1/completions (token count)", (time.perf_counter() - start) * MS_PER_S, error=reason
        )
    if count is None:
        state.setup_errors[prompt.id] = reason
        return
    state.prompt_tokens[prompt.id] = count
    if count >= seq_len:
        state.setup_errors[prompt.id] = (
            f"prompt {prompt.id}: prompt_tokens={count} >= --seq-len={seq_len}; "
            "the output length seq_len - prompt_tokens must be >= 1"
        )
        return
    state.requested[prompt.id] = seq_len - count


@events.test_stop.add_listener
def on_test_stop(environment, **_kwargs) -> None:
    """Write the report of the finished (or interrupted) run."""
    state = STATE
    if state.options is None or not state.prompts or not isinstance(environment.runner, LocalRunner):
        return
    opts = state.options
    run = {
        "host": state.host,
        "model": state.model,
        "mode": opts.mode,
        "seq_len": opts.seq_len,
        "runs_per_prompt": opts.runs_per_prompt if opts.mode == "contest" else None,
        "warmup_runs": opts.warmup_runs,
        "prompt_file": opts.prompt_file or "loadtest/data/prompts.txt (contest)",
        "baseline": opts.baseline or None,
        "reference": opts.reference or None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(state.started)),
        "duration_s": time.perf_counter() - state.started_mono,
        "users_max": max((s.users for s in state.samples), default=0),
        "setup_errors": state.setup_errors,
        "fatal": state.fatal,
        "locust_failures": sum(e.occurrences for e in environment.runner.stats.errors.values()),
    }
    report = build_report(
        prompts=state.prompts,
        samples=state.samples,
        run=run,
        prompt_tokens=state.prompt_tokens,
        requested_tokens=state.requested,
        baselines=state.baselines,
        references=state.references,
        mac_ratio=state.mac_ratio,
        mac_ratio_note=state.mac_ratio_note,
        setup_errors=state.setup_errors,
    )
    try:
        written = write_report(report, state.samples, state.report_dir)
    except OSError as exc:
        log.error("prompts.py: report not written to %s (%s)", state.report_dir, exc)
        return
    log.info("prompts.py: report written to %s: %s", state.report_dir, ", ".join(p.name for p in written))
    print(f"\nreport: {state.report_dir / 'report.json'}\n{format_table(report)}\n", flush=True)


class CompletionUser(User):
    """Sends streamed completions and times them on the client; see the module docstring for the two modes."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.session = _session(STATE.options)
        self.number = next(STATE.user_ids)
        self.sent = 0  # load mode: requests sent by this user, to walk the prompt mix

    def on_stop(self) -> None:
        self.session.close()

    @task
    def next_request(self) -> None:
        state = STATE
        if state.fatal:
            raise StopUser()
        if state.options.mode == "load":
            runnable = state.runnable
            prompt = runnable[(self.number + self.sent) % len(runnable)]
            self.sent += 1
            self._complete(state, prompt, warmup=False)
            return
        if state.owner is None:
            state.owner = self
        elif state.owner is not self:
            log.warning("prompts.py: contest mode runs one user; user %d stays idle", self.number)
            raise StopUser()
        if not state.plan:
            self._finish()
        prompt, warmup = state.plan.pop(0)
        self._complete(state, prompt, warmup=warmup)

    def _finish(self) -> None:
        """Contest runs are done: a headless run quits (the report is written on the way), a web UI run stops."""
        runner = self.environment.runner
        gevent.spawn(runner.quit if self.environment.parsed_options.headless else runner.stop)
        raise StopUser()

    def _complete(self, state: RunState, prompt: Prompt, *, warmup: bool) -> None:
        opts = state.options
        n = state.requested[prompt.id]
        body = {
            "model": state.model,
            "prompt": prompt.text,
            "max_tokens": n,
            "min_tokens": n,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        users = self.environment.runner.user_count if self.environment.runner else 1
        started_at = time.perf_counter() - state.started_mono
        start = time.perf_counter()
        reader = StreamReader(start)
        error = None
        try:
            with self.session.post(
                f"{state.host}/v1/completions", json=body, stream=True, timeout=(CONNECT_TIMEOUT_S, opts.stall_timeout)
            ) as resp:
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}: {resp.text[:ERROR_BODY_CHARS]}"
                else:
                    error = _read_stream(resp, reader, start, opts)
        except requests.Timeout:
            error = f"stall: no response within --stall-timeout={opts.stall_timeout:g} s"
        except requests.RequestException as exc:
            error = f"connection failed: {type(exc).__name__}: {str(exc)[:ERROR_BODY_CHARS]}"
        result = reader.finish(time.perf_counter(), expected_tokens=n, error=error)
        label = f"{prompt.id}:{prompt.name}"
        _fire(
            self.environment,
            "POST",
            f"{'warm-up' if warmup else '/v1/completions'} {label}",
            result.e2e_s * MS_PER_S,
            length=result.output_tokens,
            error=result.error,
        )
        if warmup:
            return
        if result.error is None:
            _fire(self.environment, "METRIC", "TTFT", result.ttft_s * MS_PER_S)
            if result.tpot_s is not None:
                _fire(self.environment, "METRIC", "TPOT", result.tpot_s * MS_PER_S)
            if result.itl_s:
                _fire(self.environment, "METRIC", "ITL max per request", max(result.itl_s) * MS_PER_S)
        state.samples.append(
            Sample(
                prompt_id=prompt.id,
                ok=result.error is None,
                e2e_s=result.e2e_s,
                ttft_s=result.ttft_s,
                tpot_s=result.tpot_s,
                itl_s=result.itl_s,
                prompt_tokens=result.prompt_tokens or state.prompt_tokens[prompt.id],
                output_tokens=result.output_tokens,
                text=result.text,
                error=result.error,
                started_at=started_at,
                users=users,
            )
        )


def _read_stream(resp: requests.Response, reader: StreamReader, start: float, opts) -> str | None:
    """Feed the body to ``reader`` as it arrives; returns a transport error, or None."""
    deadline = start + opts.request_timeout
    read1 = getattr(resp.raw, "read1", None)
    chunks = iter(lambda: read1(READ_BYTES), b"") if read1 else resp.iter_content(chunk_size=None)
    try:
        for data in chunks:
            now = time.perf_counter()
            reader.feed(data, now)
            if now > deadline:
                return f"timeout: request exceeded --request-timeout={opts.request_timeout:g} s"
    except Exception as exc:  # urllib3 raises its own timeout and protocol errors from a raw read
        if "timeout" in type(exc).__name__.lower() or isinstance(exc, TimeoutError):
            return f"stall: no data within --stall-timeout={opts.stall_timeout:g} s"
        return f"broken stream: {type(exc).__name__}"
    return None
