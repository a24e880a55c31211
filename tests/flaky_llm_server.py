"""A scripted OpenAI-compatible chat-completions server, for tests of how the stack
survives an LLM backend that fails: a stand-in for vLLM behind `--llm-engine openai`.

    with FlakyLlmServer(script=["drop_mid_stream"]) as llm:   # then "ok" for ever
        env = {"VOICESTACK_LLM_ENGINE": "openai", "VOICESTACK_LLM_URL": llm.url,
               "VOICESTACK_LLM_MODEL": llm.model}

Each POST /v1/chat/completions takes the next behaviour from `script`, or `default`
once the script is used up:

  ok               the reply word by word, a chunk with finish_reason "stop", [DONE]
  drop_mid_stream  3 words, then the socket closes (no finish_reason, no last chunk)
  error_first      HTTP 500 before any token
  stall            2 words, then nothing for `stall_seconds` (or until stop())
  tool_calls       `tool_text` word by word (if any), then `tool_calls` as vLLM and OpenAI
                   stream them: per call, a fragment with its index, id, type and name, then
                   its arguments' JSON in pieces of `fragment_chars`; the last chunk has
                   finish_reason `tool_finish` ("tool_calls"), then [DONE]

Only `stream: true` is served (all OpenAIEngine sends). GET /v1/models lists `model`;
GET /health answers 200 while `healthy` is true, 503 (as vLLM while it loads) when not.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY = "Paris is the capital of France."
BEHAVIOURS = ("ok", "drop_mid_stream", "error_first", "stall", "tool_calls")
# What `tool_calls` streams unless told otherwise: (id, name, arguments JSON).
TOOL_CALLS = (("call_weather_1", "get_weather", '{"city": "Paris", "unit": "celsius"}'),)
DROP_AFTER_WORDS = 3
STALL_AFTER_WORDS = 2


class FlakyLlmServer:
    def __init__(self, script=(), default: str = "ok", model: str = "flaky-test-model", reply: str = REPLY,
                 word_delay: float = 0.02, stall_seconds: float = 600.0, tool_calls=TOOL_CALLS,
                 tool_text: str = "", fragment_chars: int = 5, tool_finish: str = "tool_calls"):
        for behaviour in (*script, default):
            _check(behaviour)
        self._script = deque(script)
        self._default = default
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # wakes stalled streams so stop() does not wait for them
        self.model = model
        self.reply = reply
        self.word_delay = word_delay  # a little pacing, like real token streaming
        self.stall_seconds = stall_seconds
        self.tool_calls = tool_calls
        self.tool_text = tool_text
        self.fragment_chars = fragment_chars
        self.tool_finish = tool_finish
        self.healthy = True
        self.session_keys: list[str | None] = []  # the x-user-id header of each chat request (session affinity)
        self.requests: list[tuple[str, dict]] = []  # (behaviour, request body) for every chat request served
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The base URL, with the API prefix, as VOICESTACK_LLM_URL wants it."""
        return f"http://127.0.0.1:{self.port}/v1"

    def behave(self, default: str, script=()) -> None:
        """From now on: `script`'s behaviours one request each, then `default`."""
        for behaviour in (*script, default):
            _check(behaviour)
        with self._lock:
            self._script = deque(script)
            self._default = default

    def behaviours(self) -> list[str]:
        with self._lock:
            return [behaviour for behaviour, _ in self.requests]

    def _next(self, body: dict) -> str:
        with self._lock:
            behaviour = self._script.popleft() if self._script else self._default
            self.requests.append((behaviour, body))
            return behaviour

    def start(self) -> "FlakyLlmServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="flaky-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FlakyLlmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _check(behaviour: str) -> None:
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}")


def _call_fragments(calls, size: int) -> list[dict]:
    """Each call as streamed deltas: its head (index, id, type, name, no arguments yet), then
    its arguments' JSON cut into pieces of `size` characters."""
    fragments = []
    for index, (ident, name, arguments) in enumerate(calls):
        fragments.append({"index": index, "id": ident, "type": "function", "function": {"name": name, "arguments": ""}})
        fragments += [{"index": index, "function": {"arguments": arguments[i: i + size]}}
                      for i in range(0, len(arguments), size)]
    return fragments


def _handler_for(server: FlakyLlmServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked streaming, as vLLM answers

        def log_message(self, *args) -> None:  # quiet: pytest shows failures, not access logs
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                return self._json(200 if server.healthy else 503, {})
            if self.path.rstrip("/") != "/v1/models":
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            self._json(200, {"object": "list", "data": [{"id": server.model, "object": "model", "owned_by": "tests"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            if not body.get("stream"):
                return self._json(400, {"error": {"message": "this test server only streams: send stream: true"}})
            server.session_keys.append(self.headers.get("x-user-id"))
            behaviour = server._next(body)
            if behaviour == "error_first":
                return self._json(500, {"error": {"message": "scripted failure before any token",
                                                  "type": "server_error"}})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            words = server.reply.split(" ")
            if behaviour == "tool_calls":
                words = server.tool_text.split(" ") if server.tool_text else []
            limit = {"drop_mid_stream": DROP_AFTER_WORDS, "stall": STALL_AFTER_WORDS}.get(behaviour, len(words))
            created, ident = int(time.time()), f"chatcmpl-flaky-{len(server.requests)}"
            try:
                self._event({"id": ident, "object": "chat.completion.chunk", "created": created, "model": server.model,
                             "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
                for i, word in enumerate(words[:limit]):
                    text = word if i == 0 else " " + word
                    self._event({"id": ident, "object": "chat.completion.chunk", "created": created,
                                 "model": server.model,
                                 "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
                    time.sleep(server.word_delay)
                if behaviour == "drop_mid_stream":
                    # Gone mid-reply, as a crashed or restarted model server: no finish_reason,
                    # no last chunk of the chunked body; the client sees the connection end.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if behaviour == "stall":
                    server._stopping.wait(server.stall_seconds)
                    self.close_connection = True
                    return
                finish, generated = "stop", len(words)
                if behaviour == "tool_calls":
                    fragments = _call_fragments(server.tool_calls, server.fragment_chars)
                    generated += len(fragments)
                    for fragment in fragments:
                        self._event({"id": ident, "object": "chat.completion.chunk", "created": created,
                                     "model": server.model, "choices": [
                                         {"index": 0, "delta": {"tool_calls": [fragment]}, "finish_reason": None}]})
                        time.sleep(server.word_delay)
                    finish = server.tool_finish
                self._event({"id": ident, "object": "chat.completion.chunk", "created": created, "model": server.model,
                             "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                             "usage": {"prompt_tokens": 12, "completion_tokens": generated,
                                       "total_tokens": 12 + generated}})
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")  # the chunked body's end
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away (barge-in, its own timeout)

        def _event(self, payload: dict) -> None:
            self._chunk(f"data: {json.dumps(payload)}\n\n".encode())

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
