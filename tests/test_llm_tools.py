"""The LLM stage calls tools: the request checked and turned into OpenAI-format dicts, the
history trimmed without parting a call from its result, vLLM's streamed call fragments
joined (against a real local HTTP server), and the embedded SmolLM2 making well-formed calls
and answering with a tool's result.

The fast tests need no model. The SmolLM2 ones assert structure (a call names one of the
tools, its arguments fit the schema), not the model's judgement, except where
load/tool_choice.py measured it right in every run (BENCHMARKS.md, "Tool calls").
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
import pytest_asyncio

from flaky_llm_server import FlakyLlmServer
from voicestack.config import Settings
from voicestack.errors import ServiceError
from voicestack.llm import server as llm_server
from voicestack.llm.engine import (
    MESSAGE_TOKENS, TOOL_CALL_TOKENS, Delta, FixedLlm, LlamaCppEngine, OpenAIEngine, _add_call_fragments,
    render_tool_turns, tool_phrase, trim_history,
)
from voicestack.v1 import llm_pb2, tools_pb2

SYSTEM = "You are a friendly voice assistant on a phone call. Answer in one or two short sentences."
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
                  "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_time", "description": "Get the current local time.",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "end_call", "description": "End the phone call.",
                                      "parameters": {"type": "object", "properties": {}}}},
    # Above: load/tool_choice.py's tuned set, as the engine's decision sees it (the same phrases).
    {"type": "function", "function": {
        "name": "book_table", "description": "Book a table at the restaurant.",
        "parameters": {"type": "object", "required": ["people", "time"], "properties": {
            "people": {"type": "integer"}, "time": {"type": "string"}, "outside": {"type": "boolean"}}}}},
]
BENCHMARKED_TOOLS = TOOLS[:3]
ROLES = {"system": llm_pb2.CHAT_ROLE_SYSTEM, "user": llm_pb2.CHAT_ROLE_USER,
         "assistant": llm_pb2.CHAT_ROLE_ASSISTANT, "tool": llm_pb2.CHAT_ROLE_TOOL}


def message(role: str, content: str = "", calls=(), answers: str = "") -> llm_pb2.ChatMessage:
    return llm_pb2.ChatMessage(role=ROLES[role], content=content, tool_call_id=answers, tool_calls=[
        tools_pb2.ToolCall(id=i, name=n, arguments_json=a) for i, n, a in calls])


def definition(name: str, parameters_json: str = "", description: str = "") -> tools_pb2.ToolDefinition:
    return tools_pb2.ToolDefinition(name=name, description=description, parameters_json=parameters_json)


WEATHER_ROUND = [
    message("system", SYSTEM),
    message("user", "What's the weather in Paris?"),
    message("assistant", "", [("call_1", "get_weather", '{"city":"Paris"}')]),
    message("tool", "sunny, 21 degrees", answers="call_1"),
]


def invalid(request: llm_pb2.GenerateRequest, match: str) -> None:
    with pytest.raises(ServiceError, match=match) as err:
        llm_server.chat_messages(request)
        llm_server.chat_tools(request)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------ the request, checked and converted


@pytest.mark.fast
def test_a_tool_round_becomes_openai_dicts():
    request = llm_pb2.GenerateRequest(messages=WEATHER_ROUND, tools=[
        definition("get_weather", json.dumps(WEATHER_SCHEMA), "Get the current weather in a city."),
        definition("end_call")])
    assert llm_server.chat_messages(request) == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny, 21 degrees", "tool_call_id": "call_1"},
    ]
    assert llm_server.chat_tools(request) == [
        {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                                          "parameters": WEATHER_SCHEMA}},
        # No parameters_json: an object with no properties, as OpenAI and vLLM want it.
        {"type": "function", "function": {"name": "end_call", "description": "",
                                          "parameters": {"type": "object", "properties": {}}}},
    ]
    assert llm_server.chat_tools(llm_pb2.GenerateRequest(messages=WEATHER_ROUND[:2])) is None


@pytest.mark.fast
@pytest.mark.parametrize("messages, match", [
    ([message("user", "hi"), message("tool", "14:32")], r"messages\[1\] is a TOOL message without tool_call_id"),
    ([message("user", "hi"), message("tool", "14:32", answers="call_9")],
     r"messages\[1\]\.tool_call_id 'call_9' names no call of an earlier ASSISTANT message"),
    # The answer before its call: not "earlier".
    ([message("user", "hi"), message("tool", "14:32", answers="call_1"),
      message("assistant", "", [("call_1", "get_time", "{}")])], r"messages\[1\]\.tool_call_id 'call_1' names no call"),
    ([message("user", "hi", [("call_1", "get_time", "{}")])], r"messages\[0\]\.tool_calls is set on a user message"),
    ([message("user", "hi", answers="call_1")], r"messages\[0\]\.tool_call_id is set on a user message"),
    ([message("user", "hi"), message("assistant", "", [("call_1", "get_time", "{}"), ("call_1", "end_call", "{}")])],
     r"messages\[1\]\.tool_calls\[1\]\.id 'call_1' is used twice"),
    ([message("user", "hi"), message("assistant", "", [("", "get_time", "{}")])],
     r"messages\[1\]\.tool_calls\[0\]\.id is empty"),
    ([message("user", "hi"), message("assistant", "", [("call_1", "get time", "{}")])],
     r"messages\[1\]\.tool_calls\[0\]\.name 'get time' is not a tool name"),
    ([message("user", "hi"), message("assistant", "", [("call_1", "get_weather", '["Paris"]')])],
     r"messages\[1\]\.tool_calls\[0\]\.arguments_json is a JSON list, not an object"),
    ([message("user", "hi"), llm_pb2.ChatMessage(role=9, content="?")],
     r"messages\[1\]\.role is unset or unknown; use SYSTEM, USER, ASSISTANT or TOOL"),
])
def test_bad_messages_say_what_to_fix(messages, match):
    invalid(llm_pb2.GenerateRequest(messages=messages), match)


@pytest.mark.fast
@pytest.mark.parametrize("tools, match", [
    ([definition("get time")], r"tools\[0\]\.name 'get time' is not a tool name: 1-64 letters, digits, _ or -"),
    ([definition("x" * 65)], r"tools\[0\]\.name 'x{65}' is not a tool name"),
    ([definition("")], r"tools\[0\]\.name '' is not a tool name"),
    ([definition("get_time"), definition("get_time")], r"tools\[1\]\.name 'get_time' is used twice"),
    ([definition("get_weather", "{city: string}")], r"tools\[0\]\.parameters_json is not JSON .*send a JSON object"),
    ([definition("get_weather", '"city"')], r"tools\[0\]\.parameters_json is a JSON str, not an object"),
    ([definition(f"tool_{i}") for i in range(129)], r"129 tools is over 128: send the ones this turn may need"),
])
def test_bad_tools_say_what_to_fix(tools, match):
    invalid(llm_pb2.GenerateRequest(messages=[message("user", "hi")], tools=tools), match)


class CallingLlm(FixedLlm):
    """FixedLlm that calls a tool when given tools, and keeps what it was asked."""

    def __init__(self):
        super().__init__()
        self.asked = []

    async def fit(self, messages, max_tokens, tools=None):
        return await super().fit(messages, max_tokens, tools)

    async def stream(self, messages, max_tokens, temperature, tools=None, session_id=""):
        self.asked.append((messages, tools))
        if tools:
            yield Delta("Let me check. ", completion_tokens=4, prompt_tokens=30)
            yield Delta("", "tool_calls", 12, 30, tool_calls=[
                {"id": "call_x", "name": "get_weather", "arguments": '{"city": "Paris"}'}])
        else:
            async for delta in super().stream(messages, max_tokens, temperature):
                yield delta


@pytest.mark.fast
async def test_the_stage_passes_tools_and_sends_the_calls_back():
    stage = llm_server.LlmStage(Settings(cheap_engines=True))
    stage.engine = engine = CallingLlm()

    async def generate(request):
        return [r async for r in stage.stream(llm_server.one_request(request), None)]

    request = llm_pb2.GenerateRequest(messages=WEATHER_ROUND[:2], tools=[
        definition("get_weather", json.dumps(WEATHER_SCHEMA), "Get the current weather in a city.")])
    replies = await generate(request)
    assert [r.text_delta for r in replies] == ["Let me check. ", ""]
    assert replies[-1].finish_reason == "tool_calls"
    assert [(c.id, c.name, json.loads(c.arguments_json)) for c in replies[-1].tool_calls] == [
        ("call_x", "get_weather", {"city": "Paris"})]
    messages, tools = engine.asked[-1]
    assert [t["function"]["name"] for t in tools] == ["get_weather"]

    # The next round: the call and its result in the history; no tools now, so none passed.
    replies = await generate(llm_pb2.GenerateRequest(messages=WEATHER_ROUND))
    assert replies[-1].finish_reason == "stop" and not replies[-1].tool_calls
    messages, tools = engine.asked[-1]
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]

    with pytest.raises(ServiceError, match="names no call") as err:
        await generate(llm_pb2.GenerateRequest(messages=[message("user", "hi"), message("tool", "x", answers="c")]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(engine.asked) == 2  # never asked


# ------------------------------------------------------------ history trimming with tool rounds


def word_count(text: str) -> int:
    return len(text.split())


def call(call_id: str, name: str, arguments: str = "{}") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_turn(i: int, words: int = 20) -> list[dict]:
    """A user question, the assistant's call, the tool's result, the answer: one turn."""
    return [{"role": "user", "content": " ".join(["ask"] * words)},
            {"role": "assistant", "content": "", "tool_calls": [call(f"call_{i}", "lookup", '{"q": "x"}')]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": " ".join(["found"] * words)},
            {"role": "assistant", "content": " ".join(["answer"] * words)}]


@pytest.mark.fast
def test_trim_counts_calls_and_results_and_never_parts_them():
    system = [{"role": "system", "content": "be brief"}]
    history = system + [m for i in range(12) for m in tool_turn(i)] + [{"role": "user", "content": "and now?"}]
    # A turn: 20 + 20 + 20 words, 4 messages, a call ("lookup", '{"q": "x"}': 1 + 2 words) and a result.
    per_turn = 60 + 4 * MESSAGE_TOKENS + (3 + TOOL_CALL_TOKENS) + TOOL_CALL_TOKENS
    fitted = trim_history(history, word_count, 600, 100)
    kept = fitted.messages[1:-1]
    assert fitted.dropped and len(kept) % 4 == 0 and kept[0]["role"] == "user"
    # Every tool result kept answers a call kept before it.
    calls_kept = set()
    for m in kept:
        calls_kept |= {c["id"] for c in m.get("tool_calls", [])}
        if m["role"] == "tool":
            assert m["tool_call_id"] in calls_kept
    assert fitted.prompt_tokens <= 600 - 100
    assert fitted.prompt_tokens == (2 + MESSAGE_TOKENS) + len(kept) // 4 * per_turn + (2 + MESSAGE_TOKENS) + 32

    # The current round (the question, its call, its result) is the question: kept whole.
    current = history[:-1] + tool_turn(99)[:3]
    fitted = trim_history(current, word_count, 600, 100)
    assert fitted.messages[-3:] == current[-3:]

    # The tools count like the system prompt: more of them, less history.
    with_tools = trim_history(history, word_count, 600, 100, tools_tokens=150)
    assert with_tools.dropped > fitted.dropped
    with pytest.raises(ServiceError, match="shorten the tools' descriptions and parameters"):
        trim_history(history, word_count, 600, 100, tools_tokens=500)


# ------------------------------------------------------------ what SmolLM2 reads, no model


@pytest.mark.fast
def test_tool_rounds_render_as_text_a_small_model_reads():
    messages = llm_server.chat_messages(llm_pb2.GenerateRequest(messages=WEATHER_ROUND))
    assert render_tool_turns(messages) == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "system", "content": "Answer the question with this result: sunny, 21 degrees"},
    ]
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_tool_turns(plain) == plain


@pytest.mark.fast
def test_tool_phrases_are_the_descriptions_first_clause():
    assert [tool_phrase(t) for t in TOOLS] == [
        "get the current local time", "get the current weather in a city", "end the phone call",
        "book a table at the restaurant"]
    bare = {"type": "function", "function": {"name": "transfer_to-agent", "description": ""}}
    assert tool_phrase(bare) == "transfer to agent"
    acronym = {"type": "function", "function": {"name": "x", "description": "URL of the page (full). More."}}
    assert tool_phrase(acronym) == "URL of the page"


# ------------------------------------------------------------ OpenAIEngine against a real HTTP server


@pytest.mark.fast
async def test_openai_joins_streamed_call_fragments():
    calls = (("call_a", "get_weather", '{"city": "Paris", "unit": "celsius"}'), ("call_b", "end_call", ""))
    with FlakyLlmServer(default="tool_calls", tool_calls=calls, tool_text="Let me check.", fragment_chars=4,
                        word_delay=0.0) as server:
        engine = OpenAIEngine(server.url, server.model, timeout=5.0)
        try:
            deltas = [d async for d in engine.stream([{"role": "user", "content": "Weather in Paris?"}], 40, 0.0,
                                                     tools=TOOLS[:3])]
        finally:
            await engine.aclose()
        body = server.requests[-1][1]
    assert body["tools"] == TOOLS[:3] and body["tool_choice"] == "auto"
    assert "".join(d.text for d in deltas) == "Let me check."  # text streams as before
    last = deltas[-1]
    assert last.finish_reason == "tool_calls" and not last.text
    assert last.tool_calls == [{"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                               {"id": "call_b", "name": "end_call", "arguments": "{}"}]  # none sent: {}
    assert all(not d.tool_calls and not d.finish_reason for d in deltas[:-1])
    assert last.completion_tokens > 0 and last.prompt_tokens == 12  # the server's usage


@pytest.mark.fast
async def test_openai_without_tools_sends_none():
    with FlakyLlmServer(word_delay=0.0) as server:
        engine = OpenAIEngine(server.url, server.model, timeout=5.0)
        try:
            deltas = [d async for d in engine.stream([{"role": "user", "content": "hi"}], 40, 0.0)]
        finally:
            await engine.aclose()
    assert deltas[-1].finish_reason == "stop" and not deltas[-1].tool_calls
    assert "tools" not in server.requests[-1][1] and "tool_choice" not in server.requests[-1][1]


@pytest.mark.fast
async def test_openai_calls_on_stop_and_bad_arguments():
    # A server that ends a reply with calls on "stop": still "tool_calls"; a call without an id gets one.
    with FlakyLlmServer(default="tool_calls", tool_calls=(("", "get_time", "{}"),), tool_finish="stop",
                        word_delay=0.0) as server:
        engine = OpenAIEngine(server.url, server.model, timeout=5.0)
        try:
            deltas = [d async for d in engine.stream([{"role": "user", "content": "time?"}], 40, 0.0, tools=TOOLS)]
            assert deltas[-1].finish_reason == "tool_calls"
            [made] = deltas[-1].tool_calls
            assert made["name"] == "get_time" and made["id"].startswith("call_") and made["arguments"] == "{}"

            # The model's arguments are not JSON: an error naming the tool, not a call the edge chokes on.
            server.tool_calls = (("call_1", "get_weather", '{"city": Paris}'),)
            with pytest.raises(ServiceError, match="called get_weather with arguments that are not a JSON object"):
                [d async for d in engine.stream([{"role": "user", "content": "weather?"}], 40, 0.0, tools=TOOLS)]

            # Cut short by max_tokens inside the call: say so, and what to raise.
            server.tool_calls, server.tool_finish = (("call_1", "get_weather", '{"city": "Par'),), "length"
            with pytest.raises(ServiceError, match="ran out of max_tokens inside its call to get_weather") as err:
                [d async for d in engine.stream([{"role": "user", "content": "weather?"}], 40, 0.0, tools=TOOLS)]
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await engine.aclose()


@pytest.mark.fast
def test_call_fragments_from_servers_that_repeat_the_head():
    calls = {}
    _add_call_fragments(calls, [{"index": 0, "id": "c1", "function": {"name": "get_weather", "arguments": '{"ci'}}])
    _add_call_fragments(calls, [{"index": 0, "id": "c1", "function": {"name": "get_weather", "arguments": 'ty": "Oslo"}'}}])
    assert calls == {0: {"id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}}


# ------------------------------------------------------------ the embedded SmolLM2 with tools


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def llama():
    engine = LlamaCppEngine()
    yield engine
    await engine.aclose()


def conversation(said: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": said}]


def fits(arguments: dict, schema: dict) -> bool:
    """The arguments have the schema's required properties, no others, each of its type."""
    types = {"string": str, "integer": int, "boolean": bool, "number": (int, float)}
    properties = schema.get("properties", {})
    return (set(schema.get("required", [])) <= arguments.keys() <= properties.keys()
            and all(isinstance(v, types[properties[k]["type"]]) for k, v in arguments.items()))


def check_call_or_text(deltas: list[Delta]) -> dict | None:
    """The reply is text, or exactly one well-formed call to one of TOOLS; the call, if any."""
    last = deltas[-1]
    assert all(not d.finish_reason and not d.tool_calls for d in deltas[:-1])
    if last.finish_reason != "tool_calls":
        assert last.finish_reason in ("stop", "length") and not last.tool_calls
        assert "".join(d.text for d in deltas).strip()
        return None
    [made] = last.tool_calls
    assert made["id"].startswith("call_") and len(made["id"]) > 8
    [tool] = [t["function"] for t in TOOLS if t["function"]["name"] == made["name"]]
    assert fits(json.loads(made["arguments"]), tool["parameters"]), made
    assert last.prompt_tokens > 10 and last.completion_tokens > 0
    return made


@pytest.mark.parametrize("said, tools", [
    ("What's the weather in Paris?", BENCHMARKED_TOOLS), ("What time is it?", BENCHMARKED_TOOLS),
    ("Tell me a joke.", BENCHMARKED_TOOLS), ("I'd like to book a table for four at 7 pm.", TOOLS)])
async def test_llamacpp_replies_with_text_or_a_well_formed_call(llama, said, tools):
    deltas = [d async for d in llama.stream(conversation(said), 48, 0.0, tools=tools)]
    made = check_call_or_text(deltas)
    if said == "What's the weather in Paris?":
        # Called, with the city, in every run of load/tool_choice.py.
        assert made and made["name"] == "get_weather" and json.loads(made["arguments"]) == {"city": "Paris"}


async def test_llamacpp_answers_with_the_tools_result(llama):
    messages = llm_server.chat_messages(llm_pb2.GenerateRequest(messages=WEATHER_ROUND))
    deltas = [d async for d in llama.stream(messages, 48, 0.0, tools=TOOLS)]
    assert check_call_or_text(deltas) is None  # after a result: text
    # Every run of load/tool_choice.py: "The weather in Paris is sunny, with a temperature of 21 degrees."
    assert "21" in "".join(d.text for d in deltas)


async def test_the_stage_on_smollm2_calls_then_answers(llama):
    stage = llm_server.LlmStage(Settings(cheap_engines=True))
    stage.engine = llama

    async def generate(request):
        return [r async for r in stage.stream(llm_server.one_request(request), None)]

    tools = [definition(t["function"]["name"], json.dumps(t["function"]["parameters"]), t["function"]["description"])
             for t in BENCHMARKED_TOOLS]
    replies = await generate(llm_pb2.GenerateRequest(messages=WEATHER_ROUND[:2], tools=tools, max_tokens=48))
    assert replies[-1].finish_reason == "tool_calls"
    [made] = replies[-1].tool_calls
    assert made.name == "get_weather" and json.loads(made.arguments_json) == {"city": "Paris"}

    # The next round, as the edge sends it: the call (with the id the stage gave) and its result.
    round_two = WEATHER_ROUND[:2] + [
        llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_ASSISTANT, tool_calls=[made]),
        message("tool", "sunny, 21 degrees", answers=made.id)]
    replies = await generate(llm_pb2.GenerateRequest(messages=round_two, tools=tools, max_tokens=48))
    assert replies[-1].finish_reason in ("stop", "length") and not any(r.tool_calls for r in replies)
    assert "21" in "".join(r.text_delta for r in replies)


async def test_llamacpp_without_tools_never_calls(llama):
    deltas = [d async for d in llama.stream(conversation("What's the weather in Paris?"), 16, 0.0)]
    assert deltas[-1].finish_reason in ("stop", "length") and not any(d.tool_calls for d in deltas)
    assert deltas[0].text  # streamed from the first token, as before


async def test_llamacpp_cancel_during_the_tool_decision_frees_the_model(llama):
    # A long history, so the decision's prompt takes a while to evaluate.
    def long_history(colour: str) -> list[dict]:
        facts = " ".join(f"Box {i} is {colour}." for i in range(200))
        return [{"role": "system", "content": f"Harbour notes. {facts}"}, {"role": "user", "content": "Weather in Oslo?"}]

    async def consume(messages):
        async for _ in llama.stream(messages, 32, 0.0, tools=TOOLS):
            pass

    # How long the whole decision takes here, now (another history: no cached prefix).
    started = time.monotonic()
    await consume(long_history("blue"))
    whole = time.monotonic() - started

    before = llama.tokens_generated
    task = asyncio.create_task(consume(long_history("red")))
    await asyncio.sleep(0.1)  # inside the prompt's evaluation
    cancelled = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llama.tokens_generated == before  # nothing written
    deltas = [d async for d in llama.stream(conversation("Hello!"), 4, 0.0)]
    assert deltas[0].text
    # The model was free within a prompt slice, not after the whole ~1500-token prompt:
    # bounded as a share of the whole decision, measured on this machine just before.
    assert time.monotonic() - cancelled < 0.5 * whole, (time.monotonic() - cancelled, whole)
