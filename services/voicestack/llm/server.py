"""LLM stage: a chat request in, the reply streamed token by token. Cancelling the
stream stops generation within a token (barge-in).

The request carries the whole conversation; the stage drops its oldest turns until the
prompt and the reply fit the model's context (engine.trim_history), and says in its span how
many messages it dropped (`voicestack.history.dropped`)."""

from __future__ import annotations

import contextlib
import logging
import time

from opentelemetry import trace

from voicestack.config import Settings
from voicestack.errors import invalid
from voicestack.llm import CONTRACT
from voicestack.llm.engine import build_engine
from voicestack.stage import Stage, one_request
from voicestack.v1 import llm_pb2, llm_pb2_grpc

ROLES = {
    llm_pb2.CHAT_ROLE_SYSTEM: "system",
    llm_pb2.CHAT_ROLE_USER: "user",
    llm_pb2.CHAT_ROLE_ASSISTANT: "assistant",
}
MAX_MESSAGES = 200
MAX_CONTENT_CHARS = 8000
MAX_TOKENS = 1024

log = logging.getLogger(__name__)


def chat_messages(request: llm_pb2.GenerateRequest) -> list[dict]:
    if not request.messages:
        raise invalid("messages is empty: send at least one user message")
    if len(request.messages) > MAX_MESSAGES:
        raise invalid(f"{len(request.messages)} messages is over {MAX_MESSAGES}; trim the history")
    messages = []
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise invalid(f"messages[{i}].role is unset or unknown; use SYSTEM, USER or ASSISTANT")
        if len(message.content) > MAX_CONTENT_CHARS:
            raise invalid(f"messages[{i}].content is over {MAX_CONTENT_CHARS} characters")
        messages.append({"role": ROLES[message.role], "content": message.content})
    return messages


class LlmStage(Stage):
    name = CONTRACT.name
    request_type = CONTRACT.request_type
    grpc_service_names = [llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name]

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.engine = build_engine(settings)

    def describe(self) -> dict:
        return {"model": self.engine.model_name, "device": self.settings.device, "engine": self.settings.llm_engine}

    def add_to_grpc(self, server) -> None:
        llm_pb2_grpc.add_LlmServiceServicer_to_server(LlmServicer(self), server)

    async def stream(self, requests, context):
        request = None
        async for request in requests:
            break
        if request is None:
            raise invalid("stream closed before the GenerateRequest was sent")
        messages = chat_messages(request)
        if not 0 <= request.max_tokens <= MAX_TOKENS:
            raise invalid(f"max_tokens must be 0-{MAX_TOKENS}")
        if not 0.0 <= request.temperature <= 2.0:
            raise invalid("temperature must be 0-2")
        max_tokens = request.max_tokens or self.settings.llm_max_tokens
        span = trace.get_current_span()
        span.set_attribute("gen_ai.request.model", self.engine.model_name)
        span.set_attribute("gen_ai.request.max_tokens", max_tokens)
        started = time.perf_counter()
        fitted = await self.engine.fit(messages, max_tokens)
        messages = fitted.messages
        span.set_attribute("voicestack.history.dropped", fitted.dropped)
        if fitted.dropped:
            log.debug("history: dropped the oldest %d of %d messages; %d kept, about %d prompt tokens "
                      "+ max_tokens %d within the context of %d", fitted.dropped, fitted.dropped + len(messages),
                      len(messages), fitted.prompt_tokens, max_tokens, fitted.n_ctx)
        first = True
        # aclosing: a cancelled stream stops the engine now, not when garbage is collected.
        async with contextlib.aclosing(self.engine.stream(messages, max_tokens, request.temperature)) as deltas:
            async for delta in deltas:
                if first:
                    first = False
                    self.record("first_token", time.perf_counter() - started)
                    span.add_event("first_token")
                if delta.finish_reason:
                    span.set_attribute("gen_ai.usage.output_tokens", delta.completion_tokens)
                    span.set_attribute("gen_ai.usage.input_tokens", delta.prompt_tokens)
                    span.set_attribute("gen_ai.response.finish_reasons", [delta.finish_reason])
                yield llm_pb2.GenerateResponse(
                    text_delta=delta.text, finish_reason=delta.finish_reason,
                    completion_tokens=delta.completion_tokens, prompt_tokens=delta.prompt_tokens,
                )
        self.record("generation", time.perf_counter() - started)


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    def __init__(self, stage: LlmStage):
        self.stage = stage

    async def Generate(self, request, context):
        async for response in self.stage.serve_grpc(one_request(request), context):
            yield response
