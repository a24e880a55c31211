"""VAD stage: PCM16 at 16 kHz in, speech started/paused/resumed/ended events out."""

from __future__ import annotations

import asyncio
import time

from voicestack import telemetry
from voicestack.config import Settings
from voicestack.errors import invalid
from voicestack.stage import Stage, first_message
from voicestack.v1 import vad_pb2, vad_pb2_grpc
from voicestack.vad import CONTRACT
from voicestack.vad.engine import TurnPolicy, build_engine, build_turn_scorer

EVENT_TYPES = {
    "speech_started": vad_pb2.VAD_EVENT_TYPE_SPEECH_STARTED,
    "speech_ended": vad_pb2.VAD_EVENT_TYPE_SPEECH_ENDED,
    "speech_paused": vad_pb2.VAD_EVENT_TYPE_SPEECH_PAUSED,
    "speech_resumed": vad_pb2.VAD_EVENT_TYPE_SPEECH_RESUMED,
}
MAX_CHUNK_BYTES = 16000 * 2  # one second: frames are 20-100 ms


def _responses(events):
    for event in events:
        response = vad_pb2.DetectResponse(
            type=EVENT_TYPES[event.type], offset_ms=event.offset_ms, decided_at_ms=event.decided_at_ms)
        if event.turn_score >= 0:
            response.turn_score = event.turn_score
        yield response


class VadStage(Stage):
    name = CONTRACT.name
    stream_spans = False  # a VAD stream lasts the session; each decision gets a span instead
    request_type = CONTRACT.request_type
    grpc_service_names = [vad_pb2.DESCRIPTOR.services_by_name["VadService"].full_name]

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.engine = build_engine(settings)
        # The end-of-turn model runs here, beside the audio and the pauses it decides on:
        # no second copy of the audio on the bus, and one decision per pause (tens of ms).
        self.turn_scorer = build_turn_scorer(settings)

    def describe(self) -> dict:
        return {"model": "silero-vad-v6", "device": "cpu", "turn_model": self.turn_scorer.model_name}

    def add_to_grpc(self, server) -> None:
        vad_pb2_grpc.add_VadServiceServicer_to_server(VadServicer(self), server)

    async def stream(self, requests, context):
        config = await first_message(requests, "config", "a VadConfig")
        if config.sample_rate_hz not in (0, 16000):
            raise invalid(f"VAD takes 16000 Hz audio, not {config.sample_rate_hz}; resample first")
        if not 0.0 <= config.threshold < 1.0:
            raise invalid(f"threshold must be in [0, 1), got {config.threshold}")
        for field in ("min_silence_ms", "min_speech_ms", "pause_ms", "turn_pause_ms"):
            if not 0 <= getattr(config, field) <= 10_000:
                raise invalid(f"{field} must be 0-10000 ms")
        if not 0.0 <= config.turn_threshold <= 1.0:
            raise invalid(f"turn_threshold must be in [0, 1] (0 = 0.5), got {config.turn_threshold}")
        turn = None
        if config.turn_model:
            turn = TurnPolicy(self.turn_scorer, config.turn_threshold or 0.5, config.turn_pause_ms or 200)
        vad = self.engine.open(
            threshold=config.threshold or 0.5,
            min_silence_ms=config.min_silence_ms or 500,
            min_speech_ms=config.min_speech_ms or 100,
            pause_ms=config.pause_ms,
            turn=turn,
        )
        async for request in requests:
            if request.WhichOneof("kind") != "audio":
                raise invalid("send the VadConfig once, then only audio")
            pcm = request.audio.pcm
            if len(pcm) > MAX_CHUNK_BYTES:
                raise invalid(f"audio chunk of {len(pcm)} bytes is over {MAX_CHUNK_BYTES}; send 20-100 ms frames")
            started = time.monotonic()
            if vad.scores_soon():  # the turn model may run (tens of ms): off the event loop
                events = await asyncio.to_thread(vad.feed, pcm)
            else:
                events = vad.feed(pcm)  # ~0.3 ms a frame: cheaper than a thread hop
            spent = time.monotonic() - started
            self.record("frame", spent)
            self.add_compute(spent)
            if events:
                with telemetry.attach(context.headers):  # the turn the edge was in when it sent this audio
                    span = telemetry.start_span("vad.detect", start_time=started, voicestack__stage="vad",
                                                voicestack__replica_id=self.settings.replica_id,
                                                voicestack__vad__events=",".join(e.type for e in events))
                    span.end()
            for response in _responses(events):
                yield response
        for response in _responses(vad.flush()):
            yield response


class VadServicer(vad_pb2_grpc.VadServiceServicer):
    def __init__(self, stage: VadStage):
        self.stage = stage

    async def Detect(self, request_iterator, context):
        async for response in self.stage.serve_grpc(request_iterator, context):
            yield response
