"""STT stage: one utterance's audio in; interim transcripts while it arrives and the
final transcript when the input closes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from opentelemetry import trace

from voicestack.audio import PIPELINE_RATE, pcm16_to_float
from voicestack.config import Settings
from voicestack.errors import invalid
from voicestack.stage import Stage, first_message
from voicestack.stt import CONTRACT
from voicestack.stt.engine import INTERIM_EVERY_SECONDS, DecodeSchedule, Heard, build_engine
from voicestack.v1 import stt_pb2, stt_pb2_grpc

MAX_CHUNK_BYTES = PIPELINE_RATE * 2  # one second
MAX_UTTERANCE_SECONDS = 60.0
MIN_INTERIM_MS = 100  # shorter would only queue decodes behind each other


@dataclass
class _Decode:
    task: asyncio.Task
    covers: int  # bytes of audio it decodes
    reported: bool = False


class SttStage(Stage):
    name = CONTRACT.name
    request_type = CONTRACT.request_type
    grpc_service_names = [stt_pb2.DESCRIPTOR.services_by_name["SttService"].full_name]

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.engine = build_engine(settings)

    def describe(self) -> dict:
        return {"model": self.settings.stt_model or "whisper-tiny.en", "device": self.settings.device}

    def add_to_grpc(self, server) -> None:
        stt_pb2_grpc.add_SttServiceServicer_to_server(SttServicer(self), server)

    async def _decode(self, pcm: bytes, language: str) -> tuple[Heard, float]:
        started = time.perf_counter()
        heard = await asyncio.to_thread(self.engine.transcribe_heard, pcm16_to_float(pcm), language)
        seconds = time.perf_counter() - started
        self.add_compute(seconds)  # interim decodes too: they cost as much
        return heard, seconds

    async def stream(self, requests, context):
        config = await first_message(requests, "config", "an SttConfig")
        if config.sample_rate_hz not in (0, PIPELINE_RATE):
            raise invalid(f"STT takes {PIPELINE_RATE} Hz audio, not {config.sample_rate_hz}; resample first")
        language = config.language.split("-")[0].lower()  # BCP-47 "fr-CA": Whisper knows "fr"
        if language and language not in self.engine.languages:
            served = "English only" if self.engine.languages == {"en"} else f"one of {', '.join(sorted(self.engine.languages))}"
            raise invalid(f"language {config.language!r} is not served: the model is {served} "
                          "(stt_model=base is multilingual)")
        audio = bytearray()
        if not 0 <= config.interim_interval_ms <= 10000:
            raise invalid(f"interim_interval_ms {config.interim_interval_ms}: 0 (the default) or up to 10000")
        if config.interim_interval_ms and config.interim_interval_ms < MIN_INTERIM_MS:
            raise invalid(f"interim_interval_ms {config.interim_interval_ms}: at least {MIN_INTERIM_MS}")
        schedule = DecodeSchedule(self.settings.stt_pause_decode, config.interim_results,
                                  config.interim_interval_ms / 1000 or INTERIM_EVERY_SECONDS)
        decode: _Decode | None = None  # the decode in flight, or the last one done
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
                schedule.add(pcm)
                if decode is not None and decode.task.done() and not decode.reported:
                    decode.reported = True
                    heard, seconds = decode.task.result()
                    if config.interim_results and heard.text and heard.text != last_interim:
                        last_interim = heard.text
                        yield stt_pb2.TranscribeResponse(text=heard.text, audio_seconds=decode.covers / 2 / PIPELINE_RATE,
                                                         compute_seconds=seconds)
                if (decode is None or decode.task.done()) and schedule.due(decode.covers if decode else 0):
                    decode = _Decode(asyncio.create_task(self._decode(bytes(audio), language)), len(audio))
            if decode is not None and schedule.final(decode.covers):
                # Nothing but quiet since that decode began: its transcript is the final one.
                heard, seconds = await decode.task
                decode = None
            else:
                heard, seconds = await self._decode(bytes(audio), language)
        finally:
            if decode is not None and not decode.task.done():
                decode.task.cancel()  # (its thread finishes in the background)
        audio_seconds = len(audio) / 2 / PIPELINE_RATE
        self.record("final", seconds)
        if self.meters:
            self.meters.audio_seconds.add(audio_seconds, {"stage": self.name})
        span = trace.get_current_span()
        span.set_attribute("voicestack.model", self.describe()["model"])
        span.set_attribute("voicestack.audio_seconds", round(audio_seconds, 3))
        span.set_attribute("voicestack.compute_seconds", round(seconds, 4))
        yield stt_pb2.TranscribeResponse(text=heard.text, is_final=True, audio_seconds=audio_seconds,
                                         compute_seconds=seconds, language=heard.language,
                                         language_probability=heard.language_probability)


class SttServicer(stt_pb2_grpc.SttServiceServicer):
    def __init__(self, stage: SttStage):
        self.stage = stage

    async def Transcribe(self, request_iterator, context):
        async for response in self.stage.serve_grpc(request_iterator, context):
            yield response
