"""A stub OpenAI-compatible endpoint on 127.0.0.1 for the fault tests: it answers every chat request
with what `behaviour` says (a reply text, an HTTP error, a hang, malformed JSON) and counts requests."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubState:
    def __init__(self, behaviour: str = "ok", reply: str = "stub reply", hang_s: float = 2.0):
        self.behaviour, self.reply, self.hang_s = behaviour, reply, hang_s
        self.requests: list[dict] = []


def _handler(state: StubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            state.requests.append(body)
            if state.behaviour == "500":
                return self._send(500, b'{"error": "boom"}')
            if state.behaviour == "hang":
                time.sleep(state.hang_s)
                return self._send(200, b"{}")
            if state.behaviour == "malformed":
                return self._send(200, b'{"choices": [ not json')
            if state.behaviour == "flaky" and len(state.requests) % 2 == 1:
                return self._send(503, b'{"error": "busy"}')
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": state.reply},
                                  "finish_reason": "stop"}]}
            self._send(200, json.dumps(reply).encode())

        def _send(self, status: int, payload: bytes):
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                pass

    return Handler


@contextmanager
def stub_endpoint(state: StubState):
    """Yields the stub's base URL (http://127.0.0.1:PORT/v1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
