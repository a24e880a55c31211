"""STT stage: one utterance's audio in; interim transcripts while it arrives and the
final transcript when the input closes."""

from __future__ import annotations

import asyncio
import contextlib
import time

from opentelemetry import trace

from voicestack.audio import PIPELINE_RATE, pcm16_to_float
from voicestack.config import Settings
from voicestack.errors import invalid
from voicestack.stage import Stage, first_message
from voicestack.stt.engine import WhisperEngine
from voicestack.v1 import stt_pb2, stt_pb2_grpc

MAX_CHUNK_BYTES = PIPELINE_RATE * 2  # one second
MAX_UTTERANCE_SECONDS = 60.0
# Interim decodes re-read the whole utterance; one per this much new audio keeps
# them from starving the final decode on a small CPU.
INTERIM_EVERY_SECONDS = 0.8


class SttStage(Stage):
    name = "stt"
    request_type = stt_pb2.TranscribeRequest
    grpc_service_names = [stt_pb2.DESCRIPTOR.services_by_name["SttService"].full_name]

    def __init__(self, settings: Settings):
        super().__init__(settings)
        from voicestack import cheap  # benchmarks only: see cheap.py
        self.engine = cheap.FixedStt() if settings.cheap_engines else WhisperEngine(
            model=settings.stt_model or None, device=settings.device,
            compute_type="int8" if settings.device == "cpu" else "float16", threads=settings.threads,
        )

    def describe(self) -> dict:
        return {"model": self.settings.stt_model or "whisper-tiny.en", "device": self.settings.device}

    def add_to_grpc(self, server) -> None:
        stt_pb2_grpc.add_SttServiceServicer_to_server(SttServicer(self), server)

    async def _decode(self, pcm: bytes) -> tuple[str, float]:
        started = time.perf_counter()
        text = await asyncio.to_thread(self.engine.transcribe, pcm16_to_float(pcm))
        return text, time.perf_counter() - started

    async def stream(self, requests, context):
        config = await first_message(requests, "config", "an SttConfig")
        if config.sample_rate_hz not in (0, PIPELINE_RATE):
            raise invalid(f"STT takes {PIPELINE_RATE} Hz audio, not {config.sample_rate_hz}; resample first")
        if config.language not in ("", "en") and not config.language.startswith("en-"):
            raise invalid(f"language {config.language!r} is not served: the model is English only")
        audio = bytearray()
        decoded_up_to = 0
        interim: asyncio.Task | None = None
        last_interim = ""
        try:
            async for request in requests:
                if request.WhichOneof("kind") != "audio":
                    raise invalid("send the SttConfig once, then only audio")
                pcm = request.audio.pcm
                if len(pcm) % 2 or len(pcm) > MAX_CHUNK_BYTES:
                    raise invalid(f"audio chunk of {len(pcm)} bytes: send PCM16 (even byte count) frames of at most 1 s")
                audio += pcm
                if len(audio) > MAX_UTTERANCE_SECONDS * PIPELINE_RATE * 2:
                    raise invalid(f"utterance longer than {MAX_UTTERANCE_SECONDS:.0f} s; end it and start another")
                if interim is not None and interim.done():
                    text, seconds = interim.result()
                    interim = None
                    if text and text != last_interim:
                        last_interim = text
                        yield stt_pb2.TranscribeResponse(text=text, audio_seconds=decoded_up_to / 2 / PIPELINE_RATE, compute_seconds=seconds)
                if (config.interim_results and interim is None
                        and len(audio) - decoded_up_to >= INTERIM_EVERY_SECONDS * PIPELINE_RATE * 2):
                    decoded_up_to = len(audio)
                    interim = asyncio.create_task(self._decode(bytes(audio)))
        finally:
            if interim is not None:
                interim.cancel()
                with contextlib.suppress(BaseException):
                    await interim  # the thread finishes its decode; the final one queues behind it
        text, seconds = await self._decode(bytes(audio))
        audio_seconds = len(audio) / 2 / PIPELINE_RATE
        self.record("final", seconds)
        if self.meters:
            self.meters.compute_seconds.add(seconds, {"stage": self.name})
            self.meters.audio_seconds.add(audio_seconds, {"stage": self.name})
        span = trace.get_current_span()
        span.set_attribute("voicestack.model", self.describe()["model"])
        span.set_attribute("voicestack.audio_seconds", round(audio_seconds, 3))
        span.set_attribute("voicestack.compute_seconds", round(seconds, 4))
        yield stt_pb2.TranscribeResponse(text=text, is_final=True, audio_seconds=audio_seconds, compute_seconds=seconds)


class SttServicer(stt_pb2_grpc.SttServiceServicer):
    def __init__(self, stage: SttStage):
        self.stage = stage

    async def Transcribe(self, request_iterator, context):
        async for response in self.stage.serve_grpc(request_iterator, context):
            yield response
