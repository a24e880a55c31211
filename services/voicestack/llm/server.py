"""LLM stage: a chat request in, the reply streamed token by token. Cancelling the
stream stops generation within a token (barge-in).

With tools, a reply may end in calls (the last response: finish_reason "tool_calls", each
call whole); the caller runs them and asks again with the calls (ASSISTANT tool_calls) and
their results (TOOL messages) added. The stage only turns the request into OpenAI-format
dicts for the engine and checks it: running tools is the edge's business.

The request carries the whole conversation; the stage drops its oldest turns until the
prompt and the reply fit the model's context (engine.trim_history), and says in its span how
many messages it dropped (`voicestack.history.dropped`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time

from opentelemetry import trace

from voicestack.config import Settings
from voicestack.errors import invalid
from voicestack.llm import CONTRACT, POOLS
from voicestack.llm.engine import build_engine
from voicestack.stage import Stage, one_request
from voicestack.v1 import llm_pb2, llm_pb2_grpc, tools_pb2

ROLES = {
    llm_pb2.CHAT_ROLE_SYSTEM: "system",
    llm_pb2.CHAT_ROLE_USER: "user",
    llm_pb2.CHAT_ROLE_ASSISTANT: "assistant",
    llm_pb2.CHAT_ROLE_TOOL: "tool",
}
MAX_MESSAGES = 200
MAX_CONTENT_CHARS = 8000  # a message's content, a call's arguments, a tool's description
MAX_SCHEMA_CHARS = 16384  # a tool's parameters_json (as the edge allows its tools')
MAX_TOKENS = 1024
MAX_TOOLS = 128  # OpenAI's limit on tools in one request, as the edge allows a session
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # what OpenAI (and vLLM's templates) accept
NO_PARAMETERS = {"type": "object", "properties": {}}  # parameters_json ""
# How often the model server's health is asked: soon after it went down (or before it first
# came up), less often while it is up.
HEALTH_SECONDS_DOWN = 1.0
HEALTH_SECONDS_UP = 3.0

log = logging.getLogger(__name__)


def chat_messages(request: llm_pb2.GenerateRequest) -> list[dict]:
    """The request's messages as OpenAI-format dicts, checked."""
    if not request.messages:
        raise invalid("messages is empty: send at least one user message")
    if len(request.messages) > MAX_MESSAGES:
        raise invalid(f"{len(request.messages)} messages is over {MAX_MESSAGES}; trim the history")
    messages = []
    call_ids: set[str] = set()  # of the calls so far: a TOOL message answers one of them
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if message.role not in ROLES:
            raise invalid(f"{where}.role is unset or unknown; use SYSTEM, USER, ASSISTANT or TOOL")
        if len(message.content) > MAX_CONTENT_CHARS:
            raise invalid(f"{where}.content is over {MAX_CONTENT_CHARS} characters")
        entry = {"role": ROLES[message.role], "content": message.content}
        if message.tool_calls:
            if message.role != llm_pb2.CHAT_ROLE_ASSISTANT:
                raise invalid(f"{where}.tool_calls is set on a {entry['role']} message: only an ASSISTANT "
                              "message carries the calls its reply made")
            entry["tool_calls"] = [_call(f"{where}.tool_calls[{j}]", call, call_ids)
                                   for j, call in enumerate(message.tool_calls)]
        if message.role == llm_pb2.CHAT_ROLE_TOOL:
            if not message.tool_call_id:
                raise invalid(f"{where} is a TOOL message without tool_call_id: set it to the id of the call "
                              "it answers")
            if message.tool_call_id not in call_ids:
                raise invalid(f"{where}.tool_call_id {message.tool_call_id!r} names no call of an earlier "
                              "ASSISTANT message: a TOOL message answers a call made before it")
            entry["tool_call_id"] = message.tool_call_id
        elif message.tool_call_id:
            raise invalid(f"{where}.tool_call_id is set on a {entry['role']} message: only a TOOL message "
                          "answers a call")
        messages.append(entry)
    return messages


def _call(where: str, call: tools_pb2.ToolCall, call_ids: set[str]) -> dict:
    if not call.id:
        raise invalid(f"{where}.id is empty: send the id the call was made with")
    if call.id in call_ids:
        raise invalid(f"{where}.id {call.id!r} is used twice: each call has its own id")
    call_ids.add(call.id)
    if not TOOL_NAME.fullmatch(call.name):
        raise invalid(f"{where}.name {call.name[:80]!r} is not a tool name: 1-64 letters, digits, _ or -")
    arguments = _json_object(f"{where}.arguments_json", call.arguments_json or "{}")
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(arguments)}}


def chat_tools(request: llm_pb2.GenerateRequest) -> list[dict] | None:
    """The request's tools as OpenAI tool dicts, checked; None when it has none."""
    if not request.tools:
        return None
    if len(request.tools) > MAX_TOOLS:
        raise invalid(f"{len(request.tools)} tools is over {MAX_TOOLS}: send the ones this turn may need")
    tools, names = [], set()
    for i, tool in enumerate(request.tools):
        where = f"tools[{i}]"
        if not TOOL_NAME.fullmatch(tool.name):
            raise invalid(f"{where}.name {tool.name[:80]!r} is not a tool name: 1-64 letters, digits, _ or -")
        if tool.name in names:
            raise invalid(f"{where}.name {tool.name!r} is used twice: tool names must be unique")
        names.add(tool.name)
        if len(tool.description) > MAX_CONTENT_CHARS:
            raise invalid(f"{where}.description is over {MAX_CONTENT_CHARS} characters")
        parameters = _json_object(f"{where}.parameters_json", tool.parameters_json, MAX_SCHEMA_CHARS) \
            if tool.parameters_json else NO_PARAMETERS
        tools.append({"type": "function",
                      "function": {"name": tool.name, "description": tool.description, "parameters": parameters}})
    return tools


def _json_object(where: str, text: str, max_chars: int = MAX_CONTENT_CHARS) -> dict:
    if len(text) > max_chars:
        raise invalid(f"{where} is over {max_chars} characters")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise invalid(f"{where} is not JSON ({exc}): send a JSON object") from None
    if not isinstance(value, dict):
        raise invalid(f"{where} is a JSON {type(value).__name__}, not an object: send a JSON object")
    return value


class LlmStage(Stage):
    name = CONTRACT.name
    request_type = CONTRACT.request_type
    grpc_service_names = [llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name]

    def __init__(self, settings: Settings):
        super().__init__(settings)
        if settings.llm_pool not in POOLS:
            raise ValueError(f"llm_pool must be one of {', '.join(POOLS)}, not {settings.llm_pool!r}")
        self.name = settings.llm_pool  # the pool's own subjects, Deployment and autoscaler
        self.engine = build_engine(settings)
        self._server_up = True  # an engine in this process is always up
        self._health_watch: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self._server_up

    @property
    def parallel(self) -> int:
        # llama.cpp in process: one generation at a time (its one KV cache); a server batches.
        return getattr(self.engine, "parallel", self.capacity)

    async def start(self, nc, meters) -> None:
        # A model server in another process (vLLM) may still be loading, or restart: the
        # replica takes streams only while it answers its health check.
        if getattr(self.engine, "health_url", None):
            self._server_up = await self.engine.healthy()
            if not self._server_up:
                log.warning("model server %s is not up yet: out of the queue group until it is",
                            self.engine.health_url)
            self._health_watch = asyncio.create_task(self._watch_model_server())
        await super().start(nc, meters)

    async def _watch_model_server(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_SECONDS_UP if self._server_up else HEALTH_SECONDS_DOWN)
            up = await self.engine.healthy()
            if up == self._server_up:
                continue
            self._server_up = up
            if up:
                log.info("model server %s is up: joining the queue group", self.engine.health_url)
            else:
                log.warning("model server %s is down: leaving the queue group until it is back",
                            self.engine.health_url)
            if self.endpoint:
                with contextlib.suppress(Exception):
                    await self.endpoint.update_queue_membership()
            await self.on_readiness(up)

    async def drain(self, deadline_seconds: float) -> None:
        if self._health_watch:
            self._health_watch.cancel()
        await super().drain(deadline_seconds)

    def describe(self) -> dict:
        return {"model": self.engine.model_name, "device": self.settings.device, "engine": self.settings.llm_engine}

    def snapshot(self) -> dict:
        return {**super().snapshot(), "model_server_up": self._server_up}

    def add_to_grpc(self, server) -> None:
        llm_pb2_grpc.add_LlmServiceServicer_to_server(LlmServicer(self), server)

    async def stream(self, requests, context):
        request = None
        async for request in requests:
            break
        if request is None:
            raise invalid("stream closed before the GenerateRequest was sent")
        messages = chat_messages(request)
        tools = chat_tools(request)
        if not 0 <= request.max_tokens <= MAX_TOKENS:
            raise invalid(f"max_tokens must be 0-{MAX_TOKENS}")
        if not 0.0 <= request.temperature <= 2.0:
            raise invalid("temperature must be 0-2")
        max_tokens = request.max_tokens or self.settings.llm_max_tokens
        span = trace.get_current_span()
        span.set_attribute("gen_ai.request.model", self.engine.model_name)
        span.set_attribute("gen_ai.request.max_tokens", max_tokens)
        # Passed only when there are tools: an engine (or a test double) that knows none still serves.
        with_tools = {"tools": tools} if tools else {}
        if tools:
            span.set_attribute("voicestack.tools.offered", len(tools))
        started = time.perf_counter()
        fitted = await self.engine.fit(messages, max_tokens, **with_tools)
        messages = fitted.messages
        span.set_attribute("voicestack.history.dropped", fitted.dropped)
        if fitted.dropped:
            log.debug("history: dropped the oldest %d of %d messages; %d kept, about %d prompt tokens "
                      "+ max_tokens %d within the context of %d", fitted.dropped, fitted.dropped + len(messages),
                      len(messages), fitted.prompt_tokens, max_tokens, fitted.n_ctx)
        first = True
        try:
            # aclosing: a cancelled stream stops the engine now, not when garbage is collected.
            async with contextlib.aclosing(
                    self.engine.stream(messages, max_tokens, request.temperature,
                                       session_id=context.session_id if context else "", **with_tools)) as deltas:
                async for delta in deltas:
                    if first:
                        first = False
                        self.record("first_token", time.perf_counter() - started)
                        span.add_event("first_token")
                    if delta.finish_reason:
                        span.set_attribute("gen_ai.usage.output_tokens", delta.completion_tokens)
                        span.set_attribute("gen_ai.usage.input_tokens", delta.prompt_tokens)
                        span.set_attribute("gen_ai.response.finish_reasons", [delta.finish_reason])
                    if delta.tool_calls:
                        span.set_attribute("voicestack.tools.called", [call["name"] for call in delta.tool_calls])
                    yield llm_pb2.GenerateResponse(
                        text_delta=delta.text, finish_reason=delta.finish_reason,
                        completion_tokens=delta.completion_tokens, prompt_tokens=delta.prompt_tokens,
                        tool_calls=[tools_pb2.ToolCall(id=call["id"], name=call["name"], arguments_json=call["arguments"])
                                    for call in delta.tool_calls],
                    )
        finally:  # a cancelled reply (barge-in) cost its time too
            # (llama.cpp in process: compute. A model server's (vLLM): the stream's time, shared in its batch.)
            self.add_compute(time.perf_counter() - started)
        self.record("generation", time.perf_counter() - started)


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    def __init__(self, stage: LlmStage):
        self.stage = stage

    async def Generate(self, request, context):
        async for response in self.stage.serve_grpc(one_request(request), context):
            yield response
