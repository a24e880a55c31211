"""A caller who switches language is answered in it: the LLM is asked to, the TTS speaks
it (fake stages: the edge's choice only; test_multilingual.py hears real French)."""

from __future__ import annotations

import pytest

from edge_harness import Call
from voicestack.v1 import llm_pb2

pytestmark = pytest.mark.fast


def tts_languages(call: Call) -> list[str]:
    return [s.first.config.language for s in call.stages.opened if s.stage == "tts"]


def instruction(request: llm_pb2.GenerateRequest) -> str:
    last = request.messages[-1]
    return last.content if last.role == llm_pb2.CHAT_ROLE_SYSTEM else ""


async def test_the_reply_follows_the_callers_language_and_an_unsure_turn_keeps_it():
    async with Call() as call:
        turns = [("What is the capital of France?", ("en", 0.99)),
                 ("Quelle est la capitale de la France ?", ("fr", 0.97)),
                 ("Okay.", ("en", 0.3)),  # unsure: the call stays in French
                 ("Wie spät ist es?", ("ru", 0.9)),  # not a language the agent speaks: English
                 ("Wie spät ist es in Berlin?", ("de", 0.8))]
        for n, (text, heard) in enumerate(turns, 1):
            call.stages.languages.append(heard)
            await call.say(400, text)
            await call.wait(lambda: call.ended(n))
        assert tts_languages(call) == ["en", "fr", "fr", "en", "de"]
        said = [instruction(r) for r in call.stages.llm_requests]
        assert said == ["", "The caller speaks French. Answer in French.",
                        "The caller speaks French. Answer in French.", "",
                        "The caller speaks German. Answer in German."]
        kept = [m.content for m in call.stages.llm_requests[-1].messages]
        assert not any("Answer in" in c for c in kept[:-1]), "the instruction is not kept in the history"
        metrics = {m.turn_index: m for m in call.of("turn_metrics")}
        assert metrics[2].language == "fr" and metrics[5].language == "de"
