"""Graceful drain on real processes: a SIGTERM'd STT replica takes no new streams,
finishes the ones it holds, then exits; no turn is lost."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest

from conftest import metric, silence, speak, words
from voicestack.client import converse
from voicestack.launcher import Stack
from voicestack.v1 import edge_pb2


@pytest.fixture(scope="module")
def two_stt(tmp_path_factory):
    # No disclosure: three callers' greetings, slow to synthesize on a busy machine, would
    # still hold the one TTS replica's places when their questions are answered.
    with Stack(ports="free", log_dir=tmp_path_factory.mktemp("drain"), env={"VOICESTACK_DISCLOSURE": "false"}) as stack:
        stack.start()
        stack.spawn("stt", name="stt-2", env={"VOICESTACK_DRAIN_SECONDS": "20"})
        stack.wait_ready(["stt-2"])
        yield stack


async def test_sigterm_drains_an_stt_replica_without_losing_a_turn(two_stt, tmp_path):
    stack = two_stt
    edge = stack.processes["edge"].address
    question = np.concatenate([silence(3000), speak("Please tell me what the capital city of France is.", tmp_path, speed=120)])
    # One turn per caller: the slow speaker's pauses could otherwise end a turn mid-question,
    # and converse() would stop at that turn, cut short by the rest of the question. No
    # speculative replies: one discarded at such a pause holds a TTS place until its clause
    # is synthesized.
    config = edge_pb2.SessionConfig(endpointing=edge_pb2.EndpointingConfig(
        mode=edge_pb2.ENDPOINTING_MODE_SILENCE, silence_ms=1200, speculation=edge_pb2.SPECULATION_MODE_OFF))
    sessions = [asyncio.create_task(converse(edge, question, config=config, timeout=120)) for _ in range(3)]

    # Wait until the utterances are being transcribed, then stop a replica that holds one.
    replicas = {name: stack.processes[name] for name in ("stt", "stt-2")}
    deadline = time.monotonic() + 60
    busy = None
    while busy is None and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        for name, process in replicas.items():
            if metric(process.metrics_port, "voicestack_streams_active") > 0:
                busy = name
                break
    assert busy, "no STT stream was ever opened"
    other = next(name for name in replicas if name != busy)
    served_before = metric(replicas[other].metrics_port, "voicestack_stage_latency_seconds_count", kind="final")
    replicas[busy].popen.send_signal(signal.SIGTERM)

    conversations = await asyncio.gather(*sessions)
    for conversation in conversations:
        assert conversation.status.name == "OK", conversation.details
        [turn] = conversation.replies
        assert {"capital", "france"} <= set(words(turn.transcript)), turn.transcript
        assert turn.reply_text.strip()
        assert not conversation.errors, conversation.errors

    # The drained replica finished its streams and exited cleanly.
    assert replicas[busy].popen.wait(30) == 0
    # A session that starts now is served by the other replica.
    later = await converse(edge, question, timeout=120)
    assert later.status.name == "OK"
    assert {"capital", "france"} <= set(words(" ".join(t.transcript for t in later.replies)))
    assert metric(replicas[other].metrics_port, "voicestack_stage_latency_seconds_count", kind="final") > served_before


async def test_sigterm_on_the_edge_sends_goaway_and_drains(two_stt):
    import grpc

    from voicestack.client import FRAME_MS, frames
    from voicestack.v1 import edge_pb2_grpc

    stack = two_stt
    edge = stack.spawn("edge", name="edge-2", env={"VOICESTACK_DRAIN_SECONDS": "3"})
    stack.wait_ready(["edge-2"])
    stop = asyncio.Event()

    async def requests():
        yield edge_pb2.ConverseRequest(config=edge_pb2.SessionConfig())
        quiet = frames(silence(FRAME_MS))[0]
        while not stop.is_set():
            yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=quiet))
            await asyncio.sleep(FRAME_MS / 1000)

    async with grpc.aio.insecure_channel(edge.address) as channel:
        call = edge_pb2_grpc.EdgeServiceStub(channel).Converse(requests(), timeout=60)
        kinds = []
        status, details = grpc.StatusCode.OK, ""
        try:
            async for event in call:
                kinds.append(event.WhichOneof("kind"))
                if kinds[-1] == "session_started":
                    edge.popen.send_signal(signal.SIGTERM)
                if kinds[-1] == "go_away":
                    assert event.go_away.deadline_ms == 3000 and "reconnect" in event.go_away.reason
        except grpc.aio.AioRpcError as error:
            status, details = error.code(), error.details()
        finally:
            stop.set()
    assert "go_away" in kinds, kinds
    # A client that stays past the deadline is ended by the edge, with a status it can act on.
    assert status == grpc.StatusCode.UNAVAILABLE and "reconnect" in details, (status, details)
    assert edge.popen.wait(30) == 0
