"""Tools through the real pipeline: nats-server, the five services with the embedded
models, speech at real-time pace over gRPC. A client-side tool answered by the client, an
HTTP tool and an MCP server's tool run by an edge configured with a tools file, and a
barge-in withdrawing a call still running."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import silence, speak, words
from mcp_orders import McpServerProcess
from voicestack.client import converse
from voicestack.v1 import edge_pb2, tools_pb2

TIME = "14:32"


def get_time_tool(timeout_ms: int = 5000) -> edge_pb2.ClientTool:
    return edge_pb2.ClientTool(timeout_ms=timeout_ms, definition=tools_pb2.ToolDefinition(
        name="get_time", description="Get the current time of day",
        parameters_json=json.dumps({"type": "object", "properties": {}})))


def said(turn) -> str:
    return " ".join(words(turn.reply_text))


async def test_a_spoken_question_is_answered_with_the_time_a_client_tool_returned(edge_address, speech_dir):
    question = np.concatenate([silence(300), speak("What time is it?", speech_dir)])
    config = edge_pb2.SessionConfig(tools=edge_pb2.ToolsConfig(client_tools=[get_time_tool()]))
    conversation = await converse(edge_address, question, config=config, timeout=120,
                                  tools={"get_time": lambda arguments: f"The time is {TIME}."})
    assert conversation.status.name == "OK", conversation.details
    assert not conversation.errors, conversation.errors
    [turn] = conversation.replies
    assert [c.name for c in conversation.tool_calls] == ["get_time"], (
        f"heard {turn.transcript!r}, answered {turn.reply_text!r}, calls {conversation.tool_calls}")
    assert [r.content for r in conversation.tool_results] == [f"The time is {TIME}."]
    assert {"14", "32"} <= set(words(turn.reply_text)), f"the answer does not say the tool's time: {turn.reply_text!r}"
    assert len(turn.audio) > 0 and turn.metrics.tool_calls == 1 and turn.metrics.tool_ms > 0


async def test_barge_in_while_a_client_tool_runs_withdraws_the_call_and_the_call_goes_on(edge_address, speech_dir):
    """The tool takes a minute; the caller speaks again meanwhile: the call is withdrawn
    (ToolCallCancelled, the client's task cancelled), the new turn is answered."""
    cancelled = asyncio.Event()

    async def slow_clock(arguments):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "noon"

    audio = np.concatenate([silence(300), speak("What time is it?", speech_dir), silence(5000),
                            speak("Never mind, tell me a joke instead.", speech_dir)])
    config = edge_pb2.SessionConfig(tools=edge_pb2.ToolsConfig(client_tools=[get_time_tool(timeout_ms=60000)],
                                                               filler_ms=60000))
    conversation = await converse(edge_address, audio, config=config, expect_turns=2, timeout=150,
                                  tools={"get_time": slow_clock})
    assert conversation.status.name == "OK", conversation.details
    assert [c.name for c in conversation.tool_calls][:1] == ["get_time"], conversation.tool_calls
    first_call = conversation.tool_calls[0].id
    assert first_call in conversation.tools_cancelled
    assert cancelled.is_set(), "the client's tool task was not cancelled"
    assert not conversation.tool_results or all(r.call_id != first_call for r in conversation.tool_results)
    first, second = conversation.replies[:2]
    # Nothing of the first answer was heard: the new speech made it stale (an empty
    # AgentTurnEnded), or it had begun and was interrupted.
    assert first.interrupted is not None or (first.ended and not first.reply_text.strip())
    assert second.ended and second.reply_text.strip()
    assert not conversation.errors, conversation.errors


# ---------------------------------------------------------------- server-side tools

class WeatherHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"forecast": "sunny and 21 degrees"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def tools_edge(stack, tmp_path_factory):
    """A second edge on the same stages, configured with an HTTP tool and an MCP server."""
    weather = ThreadingHTTPServer(("127.0.0.1", 0), WeatherHandler)
    threading.Thread(target=weather.serve_forever, daemon=True).start()
    mcp = McpServerProcess(tmp_path_factory.mktemp("mcp")).start()
    tools_file = tmp_path_factory.mktemp("tools") / "tools.json"
    tools_file.write_text(json.dumps({
        "http_tools": [{
            "name": "get_weather", "description": "Get the weather forecast for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "url": f"http://127.0.0.1:{weather.server_port}/weather?city={{city}}", "method": "GET",
            "timeout_ms": 3000}],
        "mcp_servers": [{"name": "orders", "url": mcp.url, "timeout_ms": 5000}],
    }))
    process = stack.spawn("edge", name="edge-tools", args=["--tools-file", str(tools_file),
                                                           "--tools-allowed-hosts", "127.0.0.1"])
    try:
        stack.wait_ready(["edge-tools"], timeout=60)
        yield process.address
    finally:
        stack.stop("edge-tools")
        mcp.stop()
        weather.shutdown()


@pytest.mark.parametrize("question, tool, expected", [
    ("What is the weather in Paris?", "get_weather", {"sunny", "21"}),
    ("What is the status of order 42?", "get_order_status", {"shipped"}),
])
async def test_a_server_side_tool_is_called_and_its_answer_spoken(tools_edge, speech_dir, question, tool, expected):
    audio = np.concatenate([silence(300), speak(question, speech_dir)])
    config = edge_pb2.SessionConfig(tools=edge_pb2.ToolsConfig(server_tools=[tool]))
    conversation = await converse(tools_edge, audio, config=config, timeout=120)
    assert conversation.status.name == "OK", conversation.details
    assert not conversation.errors, conversation.errors
    [turn] = conversation.replies
    assert turn.metrics.tool_calls >= 1, f"no tool was called; the agent said {turn.reply_text!r}"
    assert expected <= set(words(turn.reply_text)), f"the answer does not carry the tool's result: {turn.reply_text!r}"
    assert len(turn.audio) > 0
