"""The edge's tool catalog (edge/tools.py): a session's tools checked at its start, the
model's arguments checked against their schemas, and the operator's server-side tools run
for real: HTTP tools against a local HTTP server, MCP tools against a real MCP server
(the mcp SDK's MCPServer over streamable HTTP, in a subprocess)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import kubernetes_validate
import pytest
import yaml

from mcp_orders import McpServerProcess
from voicestack.config import Settings, load_settings
from voicestack.edge import tools as tools_module
from voicestack.edge.tools import END_CALL, ServerTools, SessionTools, ToolFailed
from voicestack.errors import ServiceError
from voicestack.launcher import free_port
from voicestack.v1 import edge_pb2, tools_pb2

SECRET = "s3cr3t-weather-token-0451"
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "units": {"type": "string"}}, "required": ["city"]}


def client_tool(name: str, schema: dict | str | None = None, timeout_ms: int = 0, description: str = "") -> edge_pb2.ClientTool:
    parameters = schema if isinstance(schema, str) else json.dumps(schema or {"type": "object", "properties": {}})
    return edge_pb2.ClientTool(definition=tools_pb2.ToolDefinition(name=name, description=description,
                                                                    parameters_json=parameters), timeout_ms=timeout_ms)


def tool_call(name: str, arguments) -> tools_pb2.ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return tools_pb2.ToolCall(id="c1", name=name, arguments_json=text)


def write_tools_file(tmp_path, content: dict, name: str = "tools.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content) if name.endswith(".yaml") else json.dumps(content))
    return str(path)


async def start_tools(tmp_path, content: dict | None, allowed: str = "127.0.0.1", environ=None, **settings) -> ServerTools:
    path = write_tools_file(tmp_path, content) if content is not None else ""
    return await ServerTools.start(Settings(tools_file=path, tools_allowed_hosts=allowed, **settings),
                                   environ=environ if environ is not None else {"WEATHER_TOKEN": SECRET})


# ---------------------------------------------------------------- a real HTTP server


class Backend(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def log_message(self, *args):  # quiet
        pass

    def _record(self, body: bytes = b"") -> dict:
        seen = {"method": self.command, "path": urlsplit(self.path).path, "query": parse_qs(urlsplit(self.path).query),
                "headers": dict(self.headers), "body": body}
        Backend.requests.append(seen)
        return seen

    def _answer(self, status: int, payload, content_type: str = "application/json", extra: dict | None = None):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        seen = self._record()
        path = seen["path"]
        if path.startswith("/weather/"):
            self._answer(200, {"city": path.split("/", 2)[2], "query": seen["query"], "sky": "clear"})
        elif path == "/slow":
            time.sleep(1.5)
            self._answer(200, {"late": True})
        elif path == "/fail":
            self._answer(500, {"error": "boom"})
        elif path == "/denied":  # a careless backend that echoes the credential it refused
            self._answer(401, f"bad token {self.headers.get('Authorization')}".encode(), "text/plain")
        elif path == "/moved":
            self._answer(302, b"", extra={"Location": "http://example.com/elsewhere"})
        elif path == "/big":
            self._answer(200, b"x" * 100_000, "text/plain")
        else:
            self._answer(404, {"error": "no such path"})

    def do_POST(self):
        seen = self._record(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self._answer(200, {"created": json.loads(seen["body"]), "path": seen["path"]})


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that gave up (timeout, cut result): expected
        pass


@pytest.fixture(scope="module")
def backend():
    server = QuietServer(("127.0.0.1", 0), Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def http_tools_file(base: str) -> dict:
    auth = {"Authorization": "env:WEATHER_TOKEN"}
    return {"http_tools": [
        {"name": "get_weather", "description": "Current weather for a city", "parameters": CITY,
         "url": base + "/weather/{city}", "headers": auth, "timeout_ms": 3000},
        {"name": "create_order", "description": "Place an order", "method": "POST",
         "parameters": {"type": "object", "properties": {"shop": {"type": "string"}, "items": {"type": "array"}},
                        "required": ["shop", "items"]},
         "url": base + "/shops/{shop}/orders", "headers": auth},
        {"name": "slow", "url": base + "/slow", "timeout_ms": 300},
        {"name": "broken", "url": base + "/fail"},
        {"name": "denied", "url": base + "/denied", "headers": auth},
        {"name": "moved", "url": base + "/moved"},
        {"name": "big", "url": base + "/big"},
    ]}


@pytest.fixture
async def http_tools(tmp_path, backend):
    tools = await start_tools(tmp_path, http_tools_file(backend))
    yield tools
    await tools.aclose()


# ---------------------------------------------------------------- a session's tools, checked at its start


def config_of(**fields) -> edge_pb2.ToolsConfig:
    return edge_pb2.ToolsConfig(**fields)


BAD_CONFIGS = {
    "schema not JSON": ("lookup", config_of(client_tools=[client_tool("lookup", "{not json")]), "not JSON"),
    "schema invalid": ("lookup", config_of(client_tools=[client_tool("lookup", {
        "type": "object", "properties": {"id": {"type": "strin"}}})]), "not a valid JSON Schema"),
    "schema invalid for its draft": ("lookup", config_of(client_tools=[client_tool("lookup", {
        "$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
        "properties": {"id": {"type": "string", "minLength": -1}}})]), "not a valid JSON Schema"),
    "schema not an object": ("lookup", config_of(client_tools=[client_tool("lookup", {"type": "string"})]), '"type": "object"'),
    "remote $ref": ("lookup", config_of(client_tools=[client_tool("lookup", {
        "type": "object", "properties": {"id": {"$ref": "http://169.254.169.254/latest"}}})]), "not local"),
    "bad name": ("get weather", config_of(client_tools=[client_tool("get weather")]), "letters, digits"),
    "duplicate client tools": ("get_time", config_of(client_tools=[client_tool("get_time"), client_tool("get_time")]),
                               "two client tools"),
    "client vs server": ("get_weather", config_of(client_tools=[client_tool("get_weather")], server_tools=["*"]),
                         "server tool"),
    "client vs end_call": (END_CALL, config_of(client_tools=[client_tool(END_CALL)], end_call=True), "built-in"),
    "unknown server tool": ("get_wether", config_of(server_tools=["get_wether"]), "unknown server tool"),
    "negative timeout": ("get_time", config_of(client_tools=[client_tool("get_time", timeout_ms=-1)]), "out of range"),
    "timeout over a minute": ("get_time", config_of(client_tools=[client_tool("get_time", timeout_ms=60001)]), "out of range"),
    "description too long": ("get_time", config_of(client_tools=[client_tool("get_time", description="x" * 1025)]), "description"),
}


@pytest.mark.fast
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
async def test_a_bad_session_tool_is_invalid_argument_naming_the_tool(case, http_tools):
    tool, config, says = BAD_CONFIGS[case]
    with pytest.raises(ServiceError) as failure:
        SessionTools.from_config(config, http_tools)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert tool in failure.value.message and says in failure.value.message, failure.value.message


@pytest.mark.fast
@pytest.mark.parametrize("fields, says", [
    ({"filler_ms": -1}, "tools.filler_ms"), ({"filler_ms": 600_000}, "tools.filler_ms"),
    ({"max_rounds": -1}, "tools.max_rounds"), ({"max_rounds": 50}, "tools.max_rounds"),
    ({"filler": "please hold " * 50}, "tools.filler"),
])
async def test_out_of_range_session_settings_are_invalid_argument(fields, says):
    with pytest.raises(ServiceError) as failure:
        SessionTools.from_config(config_of(client_tools=[client_tool("get_time")], **fields), ServerTools())
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT and says in failure.value.message


@pytest.mark.fast
async def test_defaults_and_what_the_model_is_offered(http_tools):
    session = SessionTools.from_config(config_of(
        client_tools=[client_tool("get_time"), client_tool("lookup", CITY, timeout_ms=250)],
        server_tools=["get_weather", "get_weather"], end_call=True), http_tools)
    assert [d.name for d in session.definitions()] == ["get_time", "lookup", "get_weather", END_CALL]
    assert (session.filler, session.filler_ms, session.max_rounds) == ("One moment.", 1000, 3)
    assert session.spec("get_time").timeout_s == 5.0 and session.spec("lookup").timeout_s == 0.25
    assert [session.spec(n).kind for n in ("get_time", "get_weather", END_CALL)] == ["client", "http", "builtin"]
    assert session.spec("get_weather").timeout_s == 3.0
    assert session.spec("nothing") is None and session.server is http_tools
    end_call = json.loads(session.spec(END_CALL).definition.parameters_json)
    assert set(end_call["properties"]) == {"reason"} and "required" not in end_call

    everything = SessionTools.from_config(config_of(server_tools=["*"], filler="Let me check.", filler_ms=400,
                                                    max_rounds=5), http_tools)
    assert [d.name for d in everything.definitions()] == http_tools.names()
    assert (everything.filler, everything.filler_ms, everything.max_rounds) == ("Let me check.", 400, 5)
    # The operator's default filler comes from settings.
    assert SessionTools.from_config(config_of(end_call=True), ServerTools(filler="Hang on.")).filler == "Hang on."


@pytest.mark.fast
async def test_arguments_are_parsed_and_checked_against_the_tools_schema():
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
              "properties": {"n": {"type": "number", "maximum": 5, "exclusiveMaximum": True}}}
    session = SessionTools.from_config(config_of(client_tools=[
        client_tool("lookup", CITY), client_tool("count", draft4), client_tool("ping", ""),
        client_tool("code", {"type": "object", "properties": {"c": {"type": "string", "pattern": "^(a+)+$"}}}),
    ], end_call=True), ServerTools())
    assert session.arguments(tool_call("lookup", {"city": "Oslo"})) == {"city": "Oslo"}
    assert session.arguments(tool_call("ping", "")) == {}
    assert session.arguments(tool_call(END_CALL, {"reason": "the caller said bye"})) == {"reason": "the caller said bye"}
    # A client's regex is not run by the edge (it could stall every session's event loop).
    assert session.arguments(tool_call("code", {"c": "a" * 40 + "!"})) == {"c": "a" * 40 + "!"}
    failures = {
        "unknown tool": (tool_call("book_flight", {}), "unknown tool 'book_flight'"),
        "not JSON": (tool_call("lookup", '{"city": '), "not JSON"),
        "not an object": (tool_call("lookup", '["Oslo"]'), "not a JSON object"),
        "missing": (tool_call("lookup", {"town": "Oslo"}), "arguments do not fit: 'city' is a required property"),
        "wrong type": (tool_call("lookup", {"city": 3}), "arguments do not fit: 3 is not of type 'string' (at city)"),
        "its own draft": (tool_call("count", {"n": 5}), "arguments do not fit: 5 is greater than or equal to the maximum of 5"),
        "end_call's schema": (tool_call(END_CALL, {"why": 1}), "arguments do not fit"),
    }
    for case, (call, says) in failures.items():
        with pytest.raises(ToolFailed) as failure:
            session.arguments(call)
        assert failure.value.tool == call.name and says in failure.value.reason, (case, failure.value.reason)


# ---------------------------------------------------------------- the tools file, checked at edge start


def one_http_tool(url: str, **fields) -> dict:
    return {"http_tools": [{"name": "get_weather", "parameters": CITY, "url": url, **fields}]}


@pytest.mark.fast
@pytest.mark.parametrize("content, allowed, says", [
    (one_http_tool("https://weather.example.com/{city}"), "", "host 'weather.example.com' is not allowed"),
    (one_http_tool("https://weather.example.com/{city}"), "example.com", "host 'weather.example.com' is not allowed"),
    (one_http_tool("https://weatherexample.com/{city}"), "*.example.com", "host 'weatherexample.com' is not allowed"),
    ({"mcp_servers": [{"name": "crm", "url": "http://crm-mcp:8000/mcp"}]}, "127.0.0.1", "host 'crm-mcp' is not allowed"),
    (one_http_tool("https://{city}.example.com/"), "*", "never its host"),
    (one_http_tool("https://w.example.com/{units}"), "*", "placeholder {units} must be a required property"),
    (one_http_tool("https://w.example.com/{city!r}"), "*", "plain argument name"),
    (one_http_tool("ftp://w.example.com/"), "*", "http:// or https://"),
    (one_http_tool("https://w.example.com/", headers={"X-Key": "env:NOT_SET"}), "*", "'NOT_SET', which is not set"),
    (one_http_tool("https://w.example.com/", method="FETCH"), "*", "method must be one of"),
    (one_http_tool("https://w.example.com/", timeout_ms=0), "*", "timeout_ms"),
    (one_http_tool("https://w.example.com/", parameters={"type": "object", "required": 3}), "*", "not a valid JSON Schema"),
    (one_http_tool("https://w.example.com/", pramaters={}), "*", "unknown keys ['pramaters']"),
    ({"http_tools": [{"name": END_CALL, "url": "https://w.example.com/"}]}, "*", "built-in"),
    ({"http_tools": [{"name": "a", "url": "https://w.example.com/"}, {"name": "a", "url": "https://w.example.com/"}]},
     "*", "two HTTP tools"),
    ({"http_tool": []}, "*", "unknown keys ['http_tool']"),
])
async def test_a_bad_tools_file_stops_the_edge_at_start_saying_what_to_fix(tmp_path, content, allowed, says):
    with pytest.raises(SystemExit) as stopped:
        await start_tools(tmp_path, content, allowed=allowed)
    message = str(stopped.value)
    assert says in message, message
    assert ("get_weather" in message or "crm" in message or END_CALL in message or "(a)" in message
            or "http_tool" in message), message
    assert SECRET not in message


@pytest.mark.fast
async def test_allowed_host_patterns_and_a_json_tools_file(tmp_path):
    content = {"http_tools": [{"name": "a", "url": "https://api.weather.example.com/x"},
                              {"name": "b", "url": "http://127.0.0.1:9/y"}]}
    path = write_tools_file(tmp_path, content, name="tools.json")
    tools = await ServerTools.start(Settings(tools_file=path, tools_allowed_hosts=" *.example.com , 127.0.0.1 "))
    try:
        assert tools.names() == ["a", "b"] and tools.spec("a").kind == "http" and tools.spec("a").timeout_s == 5.0
    finally:
        await tools.aclose()
    empty = await ServerTools.start(Settings())
    assert empty.names() == [] and empty.filler == "One moment."
    await empty.aclose()


# ---------------------------------------------------------------- HTTP tools, for real


@pytest.mark.fast
async def test_http_get_fills_the_url_and_sends_the_secret_header(http_tools, caplog):
    caplog.set_level(logging.DEBUG)
    Backend.requests.clear()
    session = SessionTools.from_config(config_of(server_tools=["get_weather"]), http_tools)
    arguments = session.arguments(tool_call("get_weather", {"city": "São Paulo/../x?y", "units": "metric"}))
    result = json.loads(await http_tools.call("get_weather", arguments))
    assert result["city"] == "S%C3%A3o%20Paulo%2F..%2Fx%3Fy"  # one path segment, encoded: no path or query injection
    assert result["query"] == {"units": ["metric"]}  # arguments the URL does not use go in the query
    assert Backend.requests[-1]["headers"]["Authorization"] == SECRET
    with pytest.raises(ToolFailed, match="may not be '..'"):
        await http_tools.call("get_weather", {"city": ".."})
    assert SECRET not in caplog.text


@pytest.mark.fast
async def test_http_post_sends_the_other_arguments_as_a_json_body(http_tools):
    Backend.requests.clear()
    result = json.loads(await http_tools.call("create_order", {"shop": "north 1", "items": ["tea", {"n": 2}]}))
    assert result == {"created": {"items": ["tea", {"n": 2}]}, "path": "/shops/north%201/orders"}
    assert Backend.requests[-1]["headers"]["Content-Type"] == "application/json"
    assert Backend.requests[-1]["headers"]["Authorization"] == SECRET


@pytest.mark.fast
@pytest.mark.parametrize("tool, says, timed_out", [
    ("slow", "timed out after 300 ms", True),
    ("broken", "HTTP 500 Internal Server Error", False),
    ("denied", "HTTP 401 Unauthorized", False),
    ("moved", "HTTP 302: redirects are not followed", False),
])
async def test_http_failures_are_tool_failed_with_a_reason_and_no_secret(http_tools, caplog, tool, says, timed_out):
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(ToolFailed) as failure:
        await http_tools.call(tool, {})
    assert failure.value.tool == tool and says in failure.value.reason and failure.value.timed_out == timed_out
    assert time.monotonic() - started < 1.0  # the slow backend takes 1.5 s; the tool's timeout is 0.3 s
    assert SECRET not in str(failure.value) and SECRET not in caplog.text
    assert tool in caplog.text  # the failure is logged, naming the tool


@pytest.mark.fast
async def test_a_long_result_is_cut(http_tools):
    text = await http_tools.call("big", {})
    assert len(text) < 16100 and text.endswith("(cut: the result was longer)")


@pytest.mark.fast
async def test_an_unreachable_http_backend_is_tool_failed(tmp_path):
    tools = await start_tools(tmp_path, {"http_tools": [{"name": "gone", "url": f"http://127.0.0.1:{free_port()}/x"}]})
    try:
        with pytest.raises(ToolFailed, match="request failed: ConnectError"):
            await tools.call("gone", {})
    finally:
        await tools.aclose()


# ---------------------------------------------------------------- MCP servers, for real


@pytest.fixture(scope="module")
def mcp_server(tmp_path_factory):
    server = McpServerProcess(tmp_path_factory.mktemp("mcp")).start()
    yield server
    server.stop()


def mcp_file(url: str, **fields) -> dict:
    return {"mcp_servers": [{"name": "orders", "url": url, "headers": {"X-Api-Key": "env:WEATHER_TOKEN"},
                             "timeout_ms": 2000, **fields}]}


async def test_mcp_tools_are_listed_at_start_and_called(tmp_path, mcp_server, caplog):
    caplog.set_level(logging.DEBUG)
    tools = await start_tools(tmp_path, mcp_file(mcp_server.url))
    try:
        assert tools.names() == ["get_order_status", "wait", "whoami"]  # "bad.name" is no LLM function name
        assert "bad.name" in caplog.text
        spec = tools.spec("get_order_status")
        assert spec.kind == "mcp" and spec.timeout_s == 2.0
        assert spec.definition.description == "Where an order is: shipped, packed or unknown."
        assert json.loads(spec.definition.parameters_json)["required"] == ["order_id"]

        session = SessionTools.from_config(config_of(server_tools=["get_order_status", "whoami"]), tools)
        arguments = session.arguments(tool_call("get_order_status", {"order_id": "A17"}))
        assert await tools.call("get_order_status", arguments) == "order A17 shipped"
        with pytest.raises(ToolFailed) as failure:
            session.arguments(tool_call("get_order_status", {"id": "A17"}))
        assert "'order_id' is a required property" in failure.value.reason
        # Calls share the one session, concurrently.
        answers = await asyncio.gather(*(tools.call("get_order_status", {"order_id": f"B{n}"}) for n in range(5)))
        assert answers == [f"order B{n} shipped" for n in range(5)]
        assert await tools.call("whoami", {}) == SECRET  # the header reached the server
    finally:
        await tools.aclose()
    assert SECRET not in caplog.text


async def test_mcp_tool_errors_and_timeouts_are_tool_failed(tmp_path, mcp_server):
    tools = await start_tools(tmp_path, mcp_file(mcp_server.url, timeout_ms=500))
    try:
        with pytest.raises(ToolFailed) as failure:
            await tools.call("get_order_status", {"order_id": "missing"})
        assert failure.value.tool == "get_order_status" and "no order missing" in failure.value.reason
        assert not failure.value.timed_out
        with pytest.raises(ToolFailed) as failure:
            await tools.call("wait", {"seconds": 5})
        assert failure.value.timed_out and "timed out after 500 ms" in failure.value.reason
        assert await tools.call("get_order_status", {"order_id": "C1"}) == "order C1 shipped"  # still connected
    finally:
        await tools.aclose()


async def test_mcp_names_prefix_filter_and_collisions(tmp_path, mcp_server, caplog):
    caplog.set_level(logging.INFO)
    content = {"http_tools": [{"name": "whoami", "url": "http://127.0.0.1:9/"}],
               "mcp_servers": [
                   {"name": "orders", "url": mcp_server.url},  # its whoami loses to the HTTP tool
                   {"name": "crm", "url": mcp_server.url, "prefix": "crm_", "tools": ["get_order_status", "refund"]},
               ]}
    tools = await start_tools(tmp_path, content)
    try:
        assert tools.names() == ["whoami", "get_order_status", "wait", "crm_get_order_status"]
        assert tools.spec("whoami").kind == "http"
        assert "whoami from MCP server orders is skipped" in caplog.text
        assert "crm has no tools named ['refund']" in caplog.text
        assert await tools.call("crm_get_order_status", {"order_id": "D4"}) == "order D4 shipped"
    finally:
        await tools.aclose()


async def test_an_mcp_server_down_at_start_is_skipped_then_joins_and_survives_a_restart(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tools_module, "MCP_RETRY_FIRST_S", 0.2)
    monkeypatch.setattr(tools_module, "MCP_RETRY_MAX_S", 0.5)
    server = McpServerProcess(tmp_path)
    tools = await start_tools(tmp_path, mcp_file(server.url))  # nothing listens yet: the edge still starts
    try:
        assert tools.names() == [] and tools.missing_servers() == ["orders"]
        assert "MCP server orders (127.0.0.1) could not be listed" in caplog.text
        with pytest.raises(ServiceError) as failure:
            SessionTools.from_config(config_of(server_tools=["get_order_status"]), tools)
        assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "get_order_status" in failure.value.message and "not reachable yet: orders" in failure.value.message

        server.start()
        for _ in range(100):
            if tools.names():
                break
            await asyncio.sleep(0.1)
        assert tools.names() == ["get_order_status", "wait", "whoami"] and tools.missing_servers() == []
        assert await tools.call("get_order_status", {"order_id": "E5"}) == "order E5 shipped"

        server.stop()  # restarted: the session it had is gone
        with pytest.raises(ToolFailed) as failure:
            await tools.call("get_order_status", {"order_id": "E6"})
        assert "orders" in failure.value.reason and SECRET not in failure.value.reason
        server.start()
        assert await tools.call("get_order_status", {"order_id": "E7"}) == "order E7 shipped"  # reconnected
    finally:
        await tools.aclose()
        server.stop()
    assert SECRET not in caplog.text


# ---------------------------------------------------------------- the Helm chart's tools values

CHART = Path(__file__).resolve().parents[1] / "charts" / "voicestack"


def helm(*args: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "helm"  # tools/get_helm.py puts it there (test_chart.py fetches it)
    if not binary.exists():
        pytest.skip("helm is not installed in the venv (`make test` installs it)")
    return subprocess.run([str(binary), *args], cwd=CHART, capture_output=True, text=True, timeout=120)


async def test_the_chart_mounts_the_tools_file_and_the_edge_accepts_what_it_renders(tmp_path):
    mcp_port = free_port()  # nothing listens: the edge starts without that server's tools
    tools_file = {
        "http_tools": [{"name": "get_weather", "description": "Current weather", "parameters": CITY,
                        "url": "https://weather.internal/api?city={city}", "headers": {"Authorization": "env:WEATHER_TOKEN"},
                        "timeout_ms": 3000}],
        "mcp_servers": [{"name": "crm", "url": f"http://127.0.0.1:{mcp_port}/mcp", "prefix": "crm_"}],
    }
    values = tmp_path / "tools-values.yaml"
    values.write_text(yaml.safe_dump({"stages": {"edge": {"tools": {
        "file": tools_file, "allowedHosts": ["weather.internal", "127.0.0.1"], "secretName": "edge-tool-secrets",
        "filler": "Hold on."}}}}))
    lint = helm("lint", ".", "--strict", "-f", str(values))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    out = helm("template", "vs", ".", "--namespace", "voice", "-f", str(values))
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        if not doc["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(doc, "1.30", strict=True)

    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "vs-voicestack-edge-tools")
    assert yaml.safe_load(config_map["data"]["tools.yaml"]) == tools_file
    edge = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "vs-voicestack-edge")
    pod = edge["spec"]["template"]
    assert pod["metadata"]["annotations"]["checksum/tools"]  # a new tools file rolls the edges
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "edge")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["envFrom"] == [{"secretRef": {"name": "edge-tool-secrets"}}]
    mount = next(m for m in container["volumeMounts"] if env["VOICESTACK_TOOLS_FILE"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] and volume["configMap"]["name"] == config_map["metadata"]["name"]
    others = [d for d in docs if d["kind"] == "Deployment" and d is not edge]
    assert not any("envFrom" in c or any(e["name"].startswith("VOICESTACK_TOOL") for e in c.get("env", []))
                   for d in others for c in d["spec"]["template"]["spec"]["containers"])

    # The edge takes the rendered environment and file as they are.
    (tmp_path / "tools.yaml").write_text(config_map["data"]["tools.yaml"])
    literal = {k: v for k, v in env.items() if v is not None}
    settings = load_settings("edge", environ={**literal, "VOICESTACK_TOOLS_FILE": str(tmp_path / "tools.yaml")})
    assert settings.tool_filler == "Hold on." and settings.tools_allowed_hosts == "weather.internal,127.0.0.1"
    tools = await ServerTools.start(settings, environ={"WEATHER_TOKEN": SECRET})
    try:
        assert tools.names() == ["get_weather"] and tools.missing_servers() == ["crm"]
    finally:
        await tools.aclose()


def test_the_chart_schema_rejects_a_misspelt_tools_key():
    out = helm("template", "vs", ".", "--set-json",
               'stages.edge.tools.file={"http_tools":[{"name":"a","url":"https://x","timout_ms":5}]}')
    assert out.returncode != 0
    assert "additional properties 'timout_ms' not allowed" in out.stderr, out.stderr
