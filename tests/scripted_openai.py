"""A scripted OpenAI-compatible chat-completions server on loopback, for the deterministic tests of the clients that
talk to one (the judge, the model score, data generation): a subclass decides each reply, the base serves it, logs
every request and can hold requests to simulate a slow or killed client."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """What to answer one request: status 200 with `text` (and finish_reason, usage), or an error status."""

    text: str = ""
    status: int = 200
    finish_reason: str = "stop"
    delay_s: float = 0.0  # wait this long first (a slow server: the client may time out)
    usage: dict = field(
        default_factory=lambda: {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    )


class ScriptedOpenAI:
    """Serves POST /v1/chat/completions; `respond(body, number)` (number: 1-based arrival order; called under
    `lock`, after the body and headers are logged) returns the Reply. Requests beyond `hold_after` wait for
    `release` (`held` is set when one waits)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.hold_after: int | None = None
        self.held, self.release = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with scripted.lock:
                    scripted.bodies.append(body)
                    scripted.headers.append({k.lower(): v for k, v in self.headers.items()})
                    number = len(scripted.bodies)
                    reply = scripted.respond(body, number)
                if scripted.hold_after is not None and number > scripted.hold_after:
                    scripted.held.set()
                    scripted.release.wait(30)
                try:
                    if reply.status != 200:
                        message = {"message": f"scripted {reply.status}", "type": "x"}
                        return self._send(reply.status, {"error": message})
                    time.sleep(reply.delay_s)
                    message = {"role": "assistant", "content": reply.text}
                    choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason}
                    head = {
                        "id": f"r{number}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                    }
                    self._send(200, {**head, "choices": [choice], "usage": reply.usage})
                except (BrokenPipeError, ConnectionResetError):  # the client timed out or was killed
                    pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def respond(self, body: dict, number: int) -> Reply:
        raise NotImplementedError

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
