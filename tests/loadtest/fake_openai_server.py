"""A fake OpenAI-compatible completions server for the load-test tests (stdlib only, loopback, random free port).

It speaks the subset the locustfile uses, the way vLLM does: ``GET /v1/models``, ``POST /tokenize``
(``{"count", "tokens"}``) and ``POST /v1/completions`` streamed as server-sent events over chunked transfer encoding,
with a final usage event and ``data: [DONE]``. A "token" is a whitespace-separated word of the prompt; generated
token i is the text ``" t<i>"``, so greedy output is deterministic.

Markers in a prompt make it misbehave, so one prompt file can mix good and bad prompts:
``FAIL500`` always answers 500; ``FLAKY`` answers 500 to every other request; ``STALL`` goes silent after two tokens
for ``stall_s``; ``TRUNCATE`` ends (with ``[DONE]``) after half the tokens; ``NODONE`` closes without ``[DONE]``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOOPBACK = "127.0.0.1"


class FakeServer:
    """Start with ``with FakeServer() as server:``; ``server.url`` is its base URL, ``server.requests`` the
    completion request bodies received (streamed ones only)."""

    def __init__(
        self,
        *,
        model: str = "fake-model",
        token_delay_s: float = 0.002,
        stall_s: float = 3.0,
        tokenize: bool = True,
        api_key: str = "",
        root: str = "",
    ):
        self.model = model
        self.root = root  # the checkpoint the model card names (vLLM's ModelCard.root, its model path)
        self.token_delay_s = token_delay_s
        self.stall_s = stall_s
        self.tokenize = tokenize
        self.api_key = api_key  # when set, /v1/* requires "Authorization: Bearer <api_key>", as vLLM's --api-key
        self.requests: list[dict] = []
        self.seen: Counter = Counter()
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((LOOPBACK, 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._httpd.server_address[1]}"

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def count_tokens(prompt: str) -> int:
    return len(prompt.split())


def _handler_for(server: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # one small write per event: without it, delayed ACKs add ~40 ms

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _json(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if not server.api_key or not self.path.startswith("/v1/"):
                return True
            if self.headers.get("Authorization") == f"Bearer {server.api_key}":
                return True
            self._json(401, {"error": "Unauthorized"})
            return False

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path == "/v1/models":
                card = {"id": server.model, "object": "model", **({"root": server.root} if server.root else {})}
                self._json(200, {"object": "list", "data": [card]})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self._authorized():
                return
            prompt = body.get("prompt", "")
            if self.path == "/tokenize" and server.tokenize:
                words = prompt.split()
                self._json(200, {"count": len(words), "tokens": list(range(len(words))), "max_model_len": 4096})
            elif self.path == "/v1/completions":
                self._complete(body, prompt)
            else:
                self._json(404, {"error": "not found"})

        def _complete(self, body: dict, prompt: str) -> None:
            n = int(body.get("max_tokens", 16))
            usage = {
                "prompt_tokens": count_tokens(prompt),
                "completion_tokens": n,
                "total_tokens": count_tokens(prompt) + n,
            }
            with server.lock:
                server.seen[prompt] += 1
                nth = server.seen[prompt]
                if body.get("stream"):
                    server.requests.append(body)
            if "FAIL500" in prompt or ("FLAKY" in prompt and nth % 2 == 0):
                self._json(500, {"error": "injected failure"})
                return
            if not body.get("stream"):
                text = "".join(f" t{i}" for i in range(n))
                self._json(200, {"choices": [{"index": 0, "text": text, "finish_reason": "length"}], "usage": usage})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            emit = n // 2 if "TRUNCATE" in prompt else n
            try:
                for i in range(emit):
                    if "STALL" in prompt and i == 2:
                        time.sleep(server.stall_s)
                    time.sleep(server.token_delay_s)
                    finish = "length" if i == n - 1 else None
                    self._event(
                        {
                            "id": "cmpl-fake",
                            "object": "text_completion",
                            "model": server.model,
                            "choices": [{"index": 0, "text": f" t{i}", "finish_reason": finish}],
                        }
                    )
                if "TRUNCATE" in prompt:
                    usage = {**usage, "completion_tokens": emit, "total_tokens": usage["prompt_tokens"] + emit}
                self._event({"id": "cmpl-fake", "object": "text_completion", "choices": [], "usage": usage})
                if "NODONE" not in prompt:
                    self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")  # the terminating zero-length chunk
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (stall tests)

        def _event(self, payload: dict) -> None:
            self._chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler
