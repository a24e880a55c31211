"""The edge's choice of LLM pool per turn (edge/routing.py), and its fallback when the
strong pool cannot take a turn (fast layer: fake stages)."""

from __future__ import annotations

import grpc
import pytest

from edge_harness import Call
from voicestack.edge.routing import choose_route, tool_words
from voicestack.v1 import edge_pb2, tools_pb2

pytestmark = pytest.mark.fast

WEATHER = tools_pb2.ToolDefinition(name="get_weather", description="Current weather forecast for a city")


@pytest.mark.parametrize("text, kwargs, pool, reason", [
    ("hello there", {}, "llm", "short request"),
    ("what's the weather in Paris", {"tool_vocabulary": tool_words([WEATHER])}, "llm-strong", "weather"),
    ("why is the sky blue", {}, "llm-strong", "reasoning"),
    ("word " * 30, {}, "llm-strong", "long request"),
    ("ok", {"history_messages": 40}, "llm-strong", "deep conversation"),
    ("why is the sky blue", {"hint": edge_pb2.LLM_ROUTE_FAST}, "llm", "client asked"),
    ("hi", {"hint": edge_pb2.LLM_ROUTE_STRONG}, "llm-strong", "client asked"),
])
def test_the_route_and_its_reason(text, kwargs, pool, reason):
    route = choose_route(text, **kwargs)
    assert route.pool == pool and reason in route.reason


async def test_each_turn_goes_to_the_pool_chosen_and_says_why():
    async with Call() as call:
        await call.say(400, "hello")
        await call.wait(lambda: call.ended(1))
        await call.say(400, "please explain why the sea is salty")
        await call.wait(lambda: call.ended(2))
        assert [s.stage for s in call.stages.opened if s.stage.startswith("llm")] == ["llm", "llm-strong"]
        metrics = call.of("turn_metrics")
        assert [m.llm_route for m in metrics] == ["llm", "llm-strong"]
        assert "reasoning" in metrics[1].llm_route_reason
        await call.hang_up()


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_a_strong_pool_that_cannot_take_the_turn_falls_back_to_the_fast_one(code):
    config = edge_pb2.SessionConfig(llm_route=edge_pb2.LLM_ROUTE_STRONG)
    async with Call(config=config) as call:
        call.stages.fail("llm-strong", "open", code)
        await call.say(400, "hello")
        await call.wait(lambda: call.ended(1))
        assert not call.of("error")
        assert call.reply_text(1) == "reply 1 to hello."
        m = call.of("turn_metrics")[0]
        assert m.llm_route == "llm" and "fell back" in m.llm_route_reason
        await call.hang_up()


async def test_a_failing_fast_pool_is_not_retried_elsewhere():
    async with Call() as call:
        call.stages.fail("llm", "open", grpc.StatusCode.UNAVAILABLE)
        await call.say(400, "hello")
        await call.wait(lambda: call.ended(1))
        assert [e.stage for e in call.of("error")] == ["llm"]
        await call.hang_up()
