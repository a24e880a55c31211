"""The edge's tool rounds on fake stages (the fast layer): client tools out and back, the
filler, barge-in withdrawing calls, end_call, failures ending the turn with one Error
naming the tool while the call goes on. The real-model tests are in test_tools_pipeline.py."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from edge_harness import SPEECH_ENDED, SPEECH_PAUSED, SPEECH_STARTED, Call, fast_settings
from voicestack.errors import ServiceError
from voicestack.v1 import edge_pb2, llm_pb2, tools_pb2

pytestmark = pytest.mark.fast

GET_TIME = tools_pb2.ToolDefinition(name="get_time", description="The current time",
                                    parameters_json=json.dumps({"type": "object", "properties": {}}))
GET_WEATHER = tools_pb2.ToolDefinition(
    name="get_weather", description="The weather in a city",
    parameters_json=json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))


def tools_config(timeout_ms: int = 2000, filler_ms: int = 0, end_call: bool = False, max_rounds: int = 0,
                 filler: str = "") -> edge_pb2.SessionConfig:
    return edge_pb2.SessionConfig(tools=edge_pb2.ToolsConfig(
        client_tools=[edge_pb2.ClientTool(definition=GET_TIME, timeout_ms=timeout_ms),
                      edge_pb2.ClientTool(definition=GET_WEATHER, timeout_ms=timeout_ms)],
        end_call=end_call, filler_ms=filler_ms, max_rounds=max_rounds, filler=filler))


def call_of(name: str, arguments: dict | None = None, call_id: str = "") -> tools_pb2.ToolCall:
    return tools_pb2.ToolCall(id=call_id or f"call_{name}", name=name, arguments_json=json.dumps(arguments or {}))


def answer(call: Call, call_id: str, content: str = "", error: str = "") -> None:
    call.session.on_tool_result(edge_pb2.ToolResult(call_id=call_id, content=content, error=error))


def kinds(call: Call) -> list[str]:
    return [e.WhichOneof("kind") for e in call.events if e.WhichOneof("kind") not in ("agent_audio", "agent_text")]


async def test_a_client_tool_is_called_and_its_result_answered_and_kept_in_the_history():
    async with Call(config=tools_config()) as call:
        call.stages.tool_calls.append(("Let me check. ", [call_of("get_time")]))
        await call.say(400, "what time is it")
        await call.wait(lambda: call.of("tool_call"))
        sent = call.of("tool_call")[0]
        assert (sent.name, json.loads(sent.arguments_json)) == ("get_time", {})
        assert [t.name for t in call.stages.llm_requests[0].tools] == ["get_time", "get_weather"]
        answer(call, sent.id, "14:32")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == "Let me check. reply 2 to 14:32."
        second = call.stages.llm_requests[1]
        assert [m.role for m in second.messages[-2:]] == [llm_pb2.CHAT_ROLE_ASSISTANT, llm_pb2.CHAT_ROLE_TOOL]
        assert second.messages[-2].tool_calls[0].name == "get_time"
        assert (second.messages[-1].tool_call_id, second.messages[-1].content) == (sent.id, "14:32")
        assert call.of("turn_metrics")[0].tool_calls == 1
        assert not call.of("error")
        # The next turn's request carries the call and its result.
        await call.say(400, "thanks")
        await call.wait(lambda: call.ended(2))
        history = call.stages.llm_requests[-1].messages
        assert [m.role for m in history[1:]] == [
            llm_pb2.CHAT_ROLE_USER, llm_pb2.CHAT_ROLE_ASSISTANT, llm_pb2.CHAT_ROLE_TOOL,
            llm_pb2.CHAT_ROLE_ASSISTANT, llm_pb2.CHAT_ROLE_USER]
        assert history[4].content == "reply 2 to 14:32."
        await call.hang_up()
    assert call.status is None
    assert not call.stages.open_streams()


async def test_a_slow_tool_gets_the_filler_once():
    config = tools_config(filler_ms=50, filler="Hold on a second.")
    async with Call(config=config) as call:
        call.stages.tool_calls.append(("", [call_of("get_time")]))
        await call.say(400, "what time is it")
        await call.wait(lambda: call.of("tool_call"))
        await asyncio.sleep(0.3)  # well past filler_ms
        answer(call, "call_get_time", "noon")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == "Hold on a second. reply 2 to noon."
        assert "".join(t.text_delta for t in call.of("agent_text")).count("Hold on") == 1


async def test_a_fast_tool_gets_no_filler():
    async with Call(config=tools_config(filler_ms=2000)) as call:
        call.stages.tool_calls.append(("", [call_of("get_time")]))
        await call.say(400, "what time is it")
        await call.wait(lambda: call.of("tool_call"))
        answer(call, "call_get_time", "noon")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == "reply 2 to noon."


async def test_barge_in_withdraws_a_pending_client_call_and_its_late_answer_is_ignored():
    async with Call(config=tools_config(timeout_ms=30000)) as call:
        call.stages.ms_per_word = 400  # the preamble is still playing when the user speaks
        call.stages.tool_calls.append(("Let me look that up for you. ", [call_of("get_time")]))
        await call.say(400, "what time is it")
        await call.wait(lambda: call.of("tool_call"))
        await call.wait(lambda: call.audio_of(1) > 0)
        call.vad(SPEECH_STARTED)
        await call.audio(600)  # over the agent, long enough to interrupt
        await call.wait(lambda: call.of("interrupted"))
        assert [c.call_id for c in call.of("tool_call_cancelled")] == ["call_get_time"]
        answer(call, "call_get_time", "too late")
        call.vad(SPEECH_ENDED)
        await call.audio(20)
        await call.wait(lambda: call.ended(2))
        assert all(m.content != "too late" for r in call.stages.llm_requests for m in r.messages)
        assert not call.of("error")
        await call.hang_up()
    assert call.status is None
    assert not call.stages.open_streams()


async def test_a_speculative_reply_never_starts_its_calls_and_a_missed_one_never_does():
    settings = fast_settings(speculation=True)
    async with Call(settings=settings, config=tools_config()) as call:
        call.stages.tool_calls.append(("", [call_of("get_time")]))
        call.stages.transcripts.append("what time")  # what the speculation hears
        call.vad(SPEECH_STARTED)
        await call.audio(400)
        call.vad(SPEECH_PAUSED)
        await call.audio(60)
        await call.wait(lambda: call.stages.llm_requests)  # the speculation asked the LLM...
        await asyncio.sleep(0.1)
        assert not call.of("tool_call")  # ...but its call waits for the turn to end
        call.stages.transcripts.append("what time is it in Tokyo")  # the final words differ: a miss
        call.stages.tool_calls.append(("", [call_of("get_weather", {"city": "Tokyo"}, "call_2")]))
        call.vad(SPEECH_ENDED)
        await call.audio(20)
        await call.wait(lambda: call.of("tool_call"))
        assert [c.id for c in call.of("tool_call")] == ["call_2"]  # only the released reply's call
        answer(call, "call_2", "sunny")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1).endswith("to sunny.")


async def test_end_call_says_goodbye_then_ends_the_call_ok():
    async with Call(config=tools_config(end_call=True)) as call:
        call.stages.tool_calls.append(("", [call_of("end_call")]))
        await call.say(400, "bye")
        await call.wait(lambda: call.session.output.closed and call._reader.done())
        assert call.status is None  # OK
        assert call.reply_text(1) == "Goodbye."
        assert call.audio_of(1) > 0
        assert kinds(call)[-1] != "error"
    assert not call.stages.open_streams()


async def test_end_call_from_an_interrupted_reply_never_ends_the_call():
    async with Call(config=tools_config(end_call=True)) as call:
        call.stages.ms_per_word = 400
        call.stages.tool_calls.append(("Thank you for calling, have a lovely day and goodbye. ", [call_of("end_call")]))
        await call.say(400, "that's all")
        await call.wait(lambda: call.audio_of(1) > 0)
        call.vad(SPEECH_STARTED)
        await call.audio(600)
        await call.wait(lambda: call.of("interrupted"))
        call.vad(SPEECH_ENDED)
        await call.audio(20)
        await call.wait(lambda: call.ended(2))
        await asyncio.sleep(0.2)
        assert not call.session.output.closed  # the call goes on
        assert call.reply_text(2)
        await call.hang_up()
    assert call.status is None


@pytest.mark.parametrize("case", ["unknown tool", "bad arguments", "client error", "client timeout"])
async def test_a_failed_call_says_so_ends_the_turn_with_one_error_naming_the_tool_and_the_call_goes_on(case):
    async with Call(config=tools_config(timeout_ms=100)) as call:
        made = {"unknown tool": call_of("book_flight", {"to": "Rome"}),
                "bad arguments": call_of("get_weather", {"town": 3}),
                "client error": call_of("get_time"),
                "client timeout": call_of("get_time")}[case]
        call.stages.tool_calls.append(("", [made]))
        await call.say(400, "do it")
        if case == "client error":
            await call.wait(lambda: call.of("tool_call"))
            answer(call, made.id, error="clock unavailable")
        await call.wait(lambda: call.ended(1))
        errors = call.of("error")
        assert len(errors) == 1 and errors[0].stage == "tools" and made.name in errors[0].message, errors
        expected = {"unknown tool": grpc.StatusCode.INVALID_ARGUMENT, "bad arguments": grpc.StatusCode.INVALID_ARGUMENT,
                    "client error": grpc.StatusCode.ABORTED, "client timeout": grpc.StatusCode.DEADLINE_EXCEEDED}[case]
        assert errors[0].code == expected.value[0]
        assert call.reply_text(1) == call.settings.tool_failure_text
        assert call.audio_of(1) > 0  # the failure line was spoken
        k = kinds(call)
        assert k[k.index("error") + 1] == "agent_turn_ended"
        if case == "client timeout":
            assert [c.call_id for c in call.of("tool_call_cancelled")] == [made.id]
        if case in ("unknown tool", "bad arguments"):
            assert not call.of("tool_call")  # never sent to the client
        await call.say(400, "never mind")  # the call goes on
        await call.wait(lambda: call.ended(2))
        assert call.reply_text(2) == "reply 2 to never mind."
        await call.hang_up()
    assert call.status is None
    assert not call.stages.open_streams()


async def test_rounds_are_bounded_the_last_one_offers_no_tools():
    async with Call(config=tools_config(max_rounds=2)) as call:
        for n in range(5):
            call.stages.tool_calls.append(("", [call_of("get_time", call_id=f"c{n}")]))
        await call.say(400, "loop")
        for n in range(2):
            await call.wait(lambda: len(call.of("tool_call")) > n)
            answer(call, f"c{n}", f"t{n}")
        await call.wait(lambda: call.ended(1))
        assert [len(r.tools) for r in call.stages.llm_requests] == [2, 2, 0]
        assert call.reply_text(1) == "reply 3 to t1."


async def test_tool_config_errors_name_the_tool():
    bad_schema = edge_pb2.SessionConfig(tools=edge_pb2.ToolsConfig(client_tools=[edge_pb2.ClientTool(
        definition=tools_pb2.ToolDefinition(name="lookup", parameters_json='{"type": "objekt"}'))]))
    duplicate = edge_pb2.SessionConfig(tools=edge_pb2.ToolsConfig(client_tools=[
        edge_pb2.ClientTool(definition=GET_TIME), edge_pb2.ClientTool(definition=GET_TIME)]))
    for config, name in ((bad_schema, "lookup"), (duplicate, "get_time")):
        with pytest.raises(ServiceError) as failure:
            async with Call(config=config):
                pass
        assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT and name in failure.value.message


@pytest.mark.parametrize("point", ["open", "first", "mid", "end", "stall"])
async def test_the_llm_failing_in_the_round_after_a_tool_ends_the_turn_once_and_the_call_goes_on(point):
    config = tools_config()
    config.llm_route = edge_pb2.LLM_ROUTE_FAST  # (a turn about the time would go to llm-strong)
    async with Call(config=config) as call:
        call.stages.tool_calls.append(("Let me check. ", [call_of("get_time")]))
        call.stages.fail("llm", "none")  # the first round is served...
        call.stages.fail("llm", point, grpc.StatusCode.INTERNAL)  # ...the one after the result fails
        await call.say(400, "what time is it")
        await call.wait(lambda: call.of("tool_call"))
        answer(call, "call_get_time", "14:32")
        await call.wait(lambda: call.ended(1))
        errors = call.of("error")
        assert len(errors) == 1 and errors[0].stage == "llm", errors
        k = kinds(call)
        assert k[k.index("error") + 1] == "agent_turn_ended"
        await call.say(400, "again")
        await call.wait(lambda: call.ended(2))
        assert call.reply_text(2).endswith("to again.")
        await call.hang_up()
    assert call.status is None
    assert not call.stages.open_streams()
