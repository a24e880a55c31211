"""TTS stage: text arrives in pieces as the LLM writes it; audio leaves clause by
clause, so the first words are spoken before the reply is finished."""

from __future__ import annotations

import asyncio
import json
import time

from opentelemetry import trace

from voicestack.bus import TTS_VOICES_SUBJECT
from voicestack.audio import trim_quiet
from voicestack.config import Settings
from voicestack.errors import invalid
from voicestack.stage import Stage, first_message
from voicestack.tts import CONTRACT
from voicestack.tts.engine import build_engine, split_clauses
from voicestack.v1 import audio_pb2, tts_pb2, tts_pb2_grpc

CHUNK_SECONDS = 0.1  # agent audio leaves in 100 ms chunks: barge-in drops at most that much queued
# Kokoro starts each clause with about 330 ms of quiet and ends it with 360-570 ms: the
# caller would wait through the first, and hear 0.7-0.9 s pauses between clauses. Kept: a
# short lead-in and a natural pause after a clause.
LEAD_MS = 60
TAIL_MS = 250
MAX_PENDING_CHARS = 4000
SPLITS = ("phrase", "clause", "sentence")  # settings.tts_split


class TtsStage(Stage):
    name = CONTRACT.name
    request_type = CONTRACT.request_type
    grpc_service_names = [tts_pb2.DESCRIPTOR.services_by_name["TtsService"].full_name]

    def __init__(self, settings: Settings):
        super().__init__(settings)
        if settings.tts_split not in SPLITS:
            raise ValueError(f"tts_split must be one of {', '.join(SPLITS)}, not {settings.tts_split!r}")
        self.engine = build_engine(settings)
        self.voices = set(self.engine.voices())

    def describe(self) -> dict:
        return {"model": "kokoro-82m-int8", "device": self.settings.device, "voice": self._default_voice()}

    def _default_voice(self) -> str:
        return self.settings.tts_voice or self.engine.default_voice

    def add_to_grpc(self, server) -> None:
        tts_pb2_grpc.add_TtsServiceServicer_to_server(TtsServicer(self), server)

    async def start(self, nc, meters) -> None:
        await super().start(nc, meters)

        async def list_voices(msg):
            await msg.respond(json.dumps(sorted(self.voices)).encode())

        await nc.subscribe(TTS_VOICES_SUBJECT, queue="vs.tts", cb=list_voices)

    async def _speak(self, clause: str, voice: str, speed: float, language: str, first: bool):
        started = time.perf_counter()
        audio = await asyncio.to_thread(self.engine.synthesize, clause, voice, speed, language)
        compute = time.perf_counter() - started
        pcm = trim_quiet(audio, self.engine.sample_rate, LEAD_MS, TAIL_MS).tobytes()
        trace.get_current_span().add_event(
            "first_audio" if first else "clause_audio",
            {"voicestack.characters": len(clause), "voicestack.compute_seconds": round(compute, 4)})
        rate = self.engine.sample_rate
        self.record("clause", compute)
        self.add_compute(compute)
        if self.meters:
            self.meters.audio_seconds.add(len(pcm) / 2 / rate, {"stage": self.name})
        step = int(CHUNK_SECONDS * rate) * 2
        for offset in range(0, len(pcm), step):
            yield tts_pb2.SynthesizeResponse(
                audio=audio_pb2.AudioChunk(pcm=pcm[offset: offset + step], sample_rate_hz=rate),
                text=clause if offset == 0 else "", compute_seconds=compute if offset == 0 else 0.0,
            )

    async def stream(self, requests, context):
        config = await first_message(requests, "config", "a TtsConfig")
        language = config.language.split("-")[0].lower() or "en"
        if language not in self.engine.languages():
            raise invalid(f"language {config.language!r} is not spoken; one of {', '.join(self.engine.languages())}")
        voice = config.voice or (self._default_voice() if language == "en" else self.engine.voice_for(language))
        if voice not in self.voices:
            raise invalid(f"unknown voice {voice!r}; available: {', '.join(sorted(self.voices))}")
        if config.speed and not 0.5 <= config.speed <= 2.0:
            raise invalid(f"speed must be 0.5-2.0, got {config.speed}")
        speed = config.speed or 1.0
        span = trace.get_current_span()
        span.set_attribute("voicestack.model", "kokoro-82m-int8")
        span.set_attribute("voicestack.tts.voice", voice)
        span.set_attribute("voicestack.tts.language", language)
        by_clause = self.settings.tts_split != "sentence"
        phrase = self.settings.tts_split == "phrase"
        pending = ""
        spoken = 0
        async for request in requests:
            if request.WhichOneof("kind") != "text":
                raise invalid("send the TtsConfig once, then only text")
            pending += request.text
            if len(pending) > MAX_PENDING_CHARS:
                raise invalid(f"over {MAX_PENDING_CHARS} characters without a clause boundary")
            clauses, pending = split_clauses(pending, clauses=by_clause, first=phrase and spoken == 0)
            for clause in clauses:
                async for response in self._speak(clause, voice, speed, language, first=spoken == 0):
                    yield response
                spoken += 1
        clauses, _ = split_clauses(pending, final=True, clauses=by_clause, first=phrase and spoken == 0)
        for clause in clauses:
            async for response in self._speak(clause, voice, speed, language, first=spoken == 0):
                yield response
            spoken += 1
        span.set_attribute("voicestack.tts.clauses", spoken)


class TtsServicer(tts_pb2_grpc.TtsServiceServicer):
    def __init__(self, stage: TtsStage):
        self.stage = stage

    async def Synthesize(self, request_iterator, context):
        async for response in self.stage.serve_grpc(request_iterator, context):
            yield response
