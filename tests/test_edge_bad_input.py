"""Bad input at the edge: each gets a clear status, and the edge keeps serving."""

from __future__ import annotations

import asyncio

import grpc
import pytest


from voicestack.launcher import Stack
from voicestack.v1 import audio_pb2, edge_pb2, edge_pb2_grpc

PCM16 = audio_pb2.AUDIO_ENCODING_PCM16


def config(**kwargs) -> edge_pb2.ConverseRequest:
    fmt = edge_pb2.SessionConfig(input_format=audio_pb2.AudioFormat(encoding=PCM16, sample_rate_hz=16000))
    fmt.MergeFrom(edge_pb2.SessionConfig(**kwargs))
    return edge_pb2.ConverseRequest(config=fmt)


def frame(pcm: bytes) -> edge_pb2.ConverseRequest:
    return edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=pcm))


async def status_of(address: str, messages: list, wait: float = 0.5):
    """Send `messages`, keep the stream open a moment, return (code, details)."""
    async def requests():
        for message in messages:
            yield message
        await asyncio.sleep(wait)

    async with grpc.aio.insecure_channel(address) as channel:
        call = edge_pb2_grpc.EdgeServiceStub(channel).Converse(requests(), timeout=20)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


TWENTY_MS = bytes(640)

BAD_INPUT = {
    "audio before config": ([frame(TWENTY_MS)], "first message must be a SessionConfig"),
    "unsupported sample rate": ([config(input_format=audio_pb2.AudioFormat(sample_rate_hz=44100))], "sample_rate_hz 44100"),
    "unsupported encoding": ([config(input_format=audio_pb2.AudioFormat(encoding=7))], "encoding"),
    "stereo": ([config(input_format=audio_pb2.AudioFormat(channels=2))], "mono"),
    "odd byte count": ([config(), frame(bytes(641))], "odd byte count"),
    "oversized frame": ([config(), frame(bytes(16000 * 2))], "over 100 ms"),
    "empty frame": ([config(), frame(b"")], "empty audio frame"),
    "second config": ([config(), config()], "already sent"),
    "unknown voice": ([config(voice="nobody")], "unknown voice 'nobody'"),
    "endpointing out of range": ([config(endpointing=edge_pb2.EndpointingConfig(silence_ms=50))], "silence_ms"),
    # Issue #20: limits where the model or the bus has them, caught at the start, naming the field.
    "greeting too long": ([config(greeting="word " * 1000)], "greeting is 5000 characters"),
    "speculative pause out of range": ([config(endpointing=edge_pb2.EndpointingConfig(speculative_pause_ms=9000))],
                                       "endpointing.speculative_pause_ms 9000"),
    "negative interruption minimum": ([config(interruption=edge_pb2.InterruptionConfig(min_speech_ms=-5))],
                                      "interruption.min_speech_ms -5"),
    "frame just over 100 ms": ([config(), frame(bytes(3202))], "100.06 ms is over 100 ms"),
    "a key that is not on a keypad": ([config(), edge_pb2.ConverseRequest(dtmf=edge_pb2.Dtmf(digits="5x"))],
                                      "dtmf.digits must be"),
    "backchannel limit out of range": ([config(interruption=edge_pb2.InterruptionConfig(backchannel_max_ms=-1))],
                                       "interruption.backchannel_max_ms -1"),
    "frame of a few samples": ([config(input_format=audio_pb2.AudioFormat(sample_rate_hz=48000)), frame(bytes(8))],
                               "under 5 ms"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
async def test_bad_input_gets_invalid_argument(edge_address, case):
    messages, expected = BAD_INPUT[case]
    code, details = await status_of(edge_address, messages)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert expected in details


async def test_a_refusal_reaches_a_bursting_asyncio_client_as_invalid_argument(edge_address):
    """Refused while the client is still sending (grpc/grpc#36066 turned that into INTERNAL
    "Internal error from Core" 8 times in 10): the status must arrive every time."""
    burst = [config(voice="nobody"), *[frame(TWENTY_MS)] * 50]
    for _ in range(10):
        async with grpc.aio.insecure_channel(edge_address) as channel:
            call = edge_pb2_grpc.EdgeServiceStub(channel).Converse(iter(burst), timeout=20)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call:
                    pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert "unknown voice" in refused.value.details()


async def test_edge_still_serves_after_bad_input(edge_address):
    code, _ = await status_of(edge_address, [config(), frame(bytes(641))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, details = await status_of(edge_address, [config(), frame(TWENTY_MS)], wait=0.3)
    assert code == grpc.StatusCode.OK, details


async def test_missing_stage_gives_unavailable_naming_it(tmp_path):
    # An edge with no stages behind it: the session must fail fast, not hang.
    with Stack(ports="free", log_dir=tmp_path) as stack:
        stack.start(["edge"])
        loop = asyncio.get_running_loop()
        started = loop.time()
        code, details = await status_of(stack.processes["edge"].address, [config(), frame(TWENTY_MS)])
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "vad" in details
    assert loop.time() - started < 15
