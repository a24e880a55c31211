"""Each stage's own gRPC API, used directly as a team would use a speech API."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import silence, speak, words
from voicestack.audio import PIPELINE_RATE, float_to_pcm16
from voicestack.v1 import audio_pb2, llm_pb2, llm_pb2_grpc, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc, vad_pb2, vad_pb2_grpc


def channel(stack, name):
    return grpc.aio.insecure_channel(stack.processes[name].address)


def chunks(audio: np.ndarray, ms: int = 20):
    pcm = float_to_pcm16(audio)
    step = PIPELINE_RATE * ms // 1000 * 2
    return [pcm[i: i + step] for i in range(0, len(pcm), step)]


async def test_vad_finds_the_speech(stack, speech_dir):
    audio = np.concatenate([silence(1000), speak("Good morning to you", speech_dir), silence(1000)])

    async def requests():
        yield vad_pb2.DetectRequest(config=vad_pb2.VadConfig(min_silence_ms=400))
        for pcm in chunks(audio):
            yield vad_pb2.DetectRequest(audio=audio_pb2.AudioChunk(pcm=pcm))

    async with channel(stack, "vad") as ch:
        events = [e async for e in vad_pb2_grpc.VadServiceStub(ch).Detect(requests())]
    types = [e.type for e in events]
    assert types == [vad_pb2.VAD_EVENT_TYPE_SPEECH_STARTED, vad_pb2.VAD_EVENT_TYPE_SPEECH_ENDED]
    assert 850 <= events[0].offset_ms <= 1200
    assert events[1].offset_ms > events[0].offset_ms + 500


async def test_stt_interim_and_final(stack, speech_dir):
    audio = speak("The weather in Paris is lovely in the spring time", speech_dir, speed=130)

    async def requests():
        yield stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(interim_results=True))
        for pcm in chunks(audio, 100):
            yield stt_pb2.TranscribeRequest(audio=audio_pb2.AudioChunk(pcm=pcm))

    async with channel(stack, "stt") as ch:
        results = [r async for r in stt_pb2_grpc.SttServiceStub(ch).Transcribe(requests())]
    final = results[-1]
    assert final.is_final and all(not r.is_final for r in results[:-1])
    assert {"paris", "lovely"} <= set(words(final.text)), final.text
    assert abs(final.audio_seconds - audio.size / PIPELINE_RATE) < 0.05


async def test_stt_interims_come_as_often_as_asked(stack, speech_dir):
    audio = speak("The weather in Paris is lovely in the spring time", speech_dir, speed=130)

    async def interims(interval_ms: int) -> int:
        async def requests():
            yield stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(interim_results=True,
                                                                     interim_interval_ms=interval_ms))
            for pcm in chunks(audio, 100):
                yield stt_pb2.TranscribeRequest(audio=audio_pb2.AudioChunk(pcm=pcm))
                await asyncio.sleep(0.1)  # a live microphone

        async with channel(stack, "stt") as ch:
            results = [r async for r in stt_pb2_grpc.SttServiceStub(ch).Transcribe(requests())]
        return sum(not r.is_final for r in results)

    often, rarely = await interims(100), await interims(10000)
    assert often >= rarely + 2, (often, rarely)


async def test_llm_streams_tokens(stack):
    request = llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content="Say hello.")], max_tokens=20)
    async with channel(stack, "llm") as ch:
        responses = [r async for r in llm_pb2_grpc.LlmServiceStub(ch).Generate(request)]
    assert len(responses) > 2
    assert "".join(r.text_delta for r in responses).strip()
    assert responses[-1].finish_reason in ("stop", "length")


async def test_tts_speaks_clause_by_clause(stack):
    async def requests():
        yield tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig())
        for piece in ["Hello there", ". How are", " you today?"]:
            yield tts_pb2.SynthesizeRequest(text=piece)

    async with channel(stack, "tts") as ch:
        responses = [r async for r in tts_pb2_grpc.TtsServiceStub(ch).Synthesize(requests())]
    clauses = [r.text for r in responses if r.text]
    assert clauses == ["Hello there.", "How are you today?"]
    assert {r.audio.sample_rate_hz for r in responses} == {24000}
    assert sum(len(r.audio.pcm) for r in responses) / 2 / 24000 > 1.0


async def test_health_and_reflection_on_every_service(stack):
    expected = {"edge": "voicestack.v1.EdgeService", "vad": "voicestack.v1.VadService",
                "stt": "voicestack.v1.SttService", "llm": "voicestack.v1.LlmService", "tts": "voicestack.v1.TtsService"}
    for name, service in expected.items():
        async with channel(stack, name) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            listed = [s.name async for r in call for s in r.list_services_response.service]
            assert service in listed and "grpc.health.v1.Health" in listed


@pytest.mark.parametrize("name, bad_first", [
    ("vad", vad_pb2.DetectRequest(audio=audio_pb2.AudioChunk(pcm=b"\0\0"))),
    ("stt", stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(sample_rate_hz=44100))),
    ("tts", tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(voice="nobody"))),
    ("tts", tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(language="tlh"))),
    ("stt", stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(interim_interval_ms=50))),
    ("stt", stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(language="fr"))),
])
async def test_stage_rejects_bad_input(stack, name, bad_first):
    stubs = {"vad": (vad_pb2_grpc.VadServiceStub, "Detect"), "stt": (stt_pb2_grpc.SttServiceStub, "Transcribe"),
             "tts": (tts_pb2_grpc.TtsServiceStub, "Synthesize")}
    stub, method = stubs[name]
    async with channel(stack, name) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in getattr(stub(ch), method)(iter([bad_first])):
                pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details()


async def test_llm_rejects_an_empty_conversation(stack):
    async with channel(stack, "llm") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in llm_pb2_grpc.LlmServiceStub(ch).Generate(llm_pb2.GenerateRequest()):
                pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages is empty" in error.value.details()
