"""The model's tool calls, run within a reply (generation.py calls `perform_tool_calls`
between LLM rounds).

  - A call starts only once its reply is released: a speculative reply's calls wait for
    its turn to end, and a superseded or interrupted reply is cancelled before they start.
  - Client tools go out as `ToolCall` events; `ClientToolCalls.answer` takes the client's
    `ToolResult` (through the session's inbox). A call withdrawn by a barge-in, or timed
    out, is told to the client with `ToolCallCancelled`.
  - A call slower than the session's filler_ms gets the filler spoken, once per reply.
  - The built-in end_call runs nothing: it marks the reply, and the session hangs up
    once the goodbye has played (never for an interrupted reply).
  - A failure (unknown tool, arguments that do not fit, a timeout, the tool's own error)
    is a `ToolError`: the reply says the failure line, then the turn ends with one Error
    naming the tool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc

from voicestack.edge.speech import SpeechHandle
from voicestack.edge.tools import END_CALL, SessionTools, ToolFailed
from voicestack.errors import StageError
from voicestack.v1 import edge_pb2, llm_pb2, tools_pb2

log = logging.getLogger(__name__)

TOOL_STAGE = "tools"  # Error.stage of a failed tool call


class ToolError(StageError):
    """A tool call failed its turn; the message names the tool."""

    def __init__(self, code: grpc.StatusCode, tool: str, reason: str):
        super().__init__(code, f"tool {tool}: {reason}", TOOL_STAGE)
        self.tool = tool


class ClientToolCalls:
    """Calls the client runs: each a ToolCall event out and a ToolResult back."""

    def __init__(self, output):
        self.output = output
        self._pending: dict[str, asyncio.Future] = {}

    def answer(self, result: edge_pb2.ToolResult) -> None:
        future = self._pending.get(result.call_id)
        if future is None or future.done():
            # A late answer to a call already timed out or withdrawn: expected, harmless.
            log.info("tool result for call %s, which is not pending (withdrawn or timed out): ignored", result.call_id)
            return
        future.set_result(result)

    async def run(self, call: tools_pb2.ToolCall, timeout_s: float) -> str:
        future = asyncio.get_running_loop().create_future()
        self._pending[call.id] = future
        self.output.send(tool_call=call)
        try:
            async with asyncio.timeout(timeout_s):
                result = await future
        except TimeoutError:
            self.output.send(tool_call_cancelled=edge_pb2.ToolCallCancelled(call_id=call.id))
            raise ToolError(grpc.StatusCode.DEADLINE_EXCEEDED, call.name,
                            f"the client did not answer within {timeout_s * 1000:.0f} ms") from None
        except asyncio.CancelledError:
            self.output.send(tool_call_cancelled=edge_pb2.ToolCallCancelled(call_id=call.id))
            raise
        finally:
            self._pending.pop(call.id, None)
        if result.error:
            raise ToolError(grpc.StatusCode.ABORTED, call.name, f"the client reported an error: {result.error}")
        return result.content


async def perform_tool_calls(ctx, handle: SpeechHandle, calls: list[tools_pb2.ToolCall],
                             say) -> list[llm_pb2.ChatMessage]:
    """Run one round's calls together; their results as TOOL messages, in call order.
    `say(text)` speaks within the reply (the filler)."""
    await handle.wait_released()  # a held speculation's calls wait for its turn to end
    started = time.monotonic()
    results: dict[str, str] = {}
    filler = None
    if not handle.filler_spoken and ctx.tools.filler:
        filler = asyncio.create_task(_filler_after(ctx, handle, say))
    try:
        async with asyncio.TaskGroup() as group:
            for call in calls:
                group.create_task(_perform_call(ctx, handle, call, results))
    except BaseExceptionGroup as failures:
        errors, others = failures.split(ToolError)
        if others is not None:
            raise
        raise errors.exceptions[0] from None
    finally:
        if filler is not None:
            filler.cancel()
        metrics = handle.turn.metrics
        metrics.tool_calls += len(calls)
        metrics.tool_ms += (time.monotonic() - started) * 1000
    return [llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_TOOL, tool_call_id=call.id, content=results[call.id])
            for call in calls]


async def _filler_after(ctx, handle: SpeechHandle, say) -> None:
    await asyncio.sleep(ctx.tools.filler_ms / 1000)
    if not handle.filler_spoken:
        handle.filler_spoken = True
        await say(ctx.tools.filler)


async def _perform_call(ctx, handle: SpeechHandle, call: tools_pb2.ToolCall, results: dict[str, str]) -> None:
    span = ctx.observer.stage_span(handle.turn, "tool.call", TOOL_STAGE, voicestack__tool__name=call.name,
                                   voicestack__tool__call_id=call.id)
    if ctx.observer.trace_text:
        span.set_attribute("voicestack.tool.arguments", await ctx.processors.run(call.arguments_json, "record", span))
    started = time.monotonic()
    outcome = "error"
    try:
        if ctx.processors.applies("tool_call"):  # (a processor here must keep the arguments JSON)
            call = tools_pb2.ToolCall(id=call.id, name=call.name,
                                      arguments_json=await ctx.processors.run(call.arguments_json, "tool_call", span))
        result = await _run(ctx, handle, call)
        if ctx.processors.applies("tool_result"):
            result = await ctx.processors.run(result, "tool_result", span)
        results[call.id] = result
        outcome = "ok"
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except ToolError as error:
        outcome = "timeout" if error.code == grpc.StatusCode.DEADLINE_EXCEEDED else "error"
        raise
    finally:
        ctx.observer.tool_call(span, call.name, outcome, time.monotonic() - started)


async def _run(ctx, handle: SpeechHandle, call: tools_pb2.ToolCall) -> str:
    tools: SessionTools = ctx.tools
    try:
        arguments = tools.arguments(call)
    except ToolFailed as failed:
        raise ToolError(grpc.StatusCode.INVALID_ARGUMENT, call.name, f"the model's call does not fit: {failed.reason}")
    spec = tools.spec(call.name)
    if spec.kind == "builtin" and call.name == END_CALL:
        handle.end_call = True
        return json.dumps({"ok": True, "note": "the call ends after this reply"})
    if spec.kind == "client":
        return await ctx.client_tools.run(call, spec.timeout_s)
    try:
        return await tools.server.call(call.name, arguments)
    except ToolFailed as failed:
        code = grpc.StatusCode.DEADLINE_EXCEEDED if failed.timed_out else grpc.StatusCode.UNAVAILABLE
        raise ToolError(code, call.name, failed.reason) from None
