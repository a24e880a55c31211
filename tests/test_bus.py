"""The stream layer (bus.py) and a stage's two faces (stage.py) on a real nats-server,
with small in-test stages instead of the models: stray and malformed messages on the
bus, one capacity across NATS and gRPC, bounded failover, drain, and gRPC statuses
that always reach the client."""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
import uuid

import grpc
import nats
import nats.errors
import pytest

from voicestack import bus
from voicestack.bus import MAX_FAILOVERS, Failover, StageClient, StageContract, StageEndpoint, open_subject
from voicestack.config import Settings
from voicestack.errors import StageError, unavailable
from voicestack.launcher import free_port, nats_server_binary, wait_for_port
from voicestack.stage import Stage, first_message
from voicestack.v1 import audio_pb2, bus_pb2, vad_pb2, vad_pb2_grpc

REQUEST, RESPONSE = vad_pb2.DetectRequest, vad_pb2.DetectResponse
CONFIG = REQUEST(config=vad_pb2.VadConfig())
GARBAGE = b"\xff\xff\xff\xff not a protobuf"  # an unterminated varint: no message parses it


def audio(samples: int) -> vad_pb2.DetectRequest:
    return REQUEST(audio=audio_pb2.AudioChunk(pcm=bytes(2 * samples)))


def contract(stage: str, failover: Failover = Failover.OPENER) -> StageContract:
    return StageContract(stage, REQUEST, RESPONSE, failover)


async def echo(requests, context):
    """One output per input: its offset_ms is the input's audio length in bytes."""
    async for request in requests:
        yield RESPONSE(offset_ms=len(request.audio.pcm))


async def eventually(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def nats_url():
    port = free_port()
    server = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 10, server)
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def stage() -> str:
    """A stage name of the test's own: tests share the server, never each other's subjects."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def stage_nc(nats_url):
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


@pytest.fixture
async def client(nats_url):
    """The opener, on its own connection as the edge would be."""
    nc = await nats.connect(nats_url)
    stages = StageClient(nc)
    await stages.start()
    yield stages
    await stages.close()
    await nc.close()


async def serve(nc, stage: str, handler=echo, capacity: int = 4, replica: str = "r1") -> StageEndpoint:
    endpoint = StageEndpoint(nc, stage, replica, capacity, handler, REQUEST)
    await endpoint.start()
    await nc.flush()  # its subscriptions are on the server before the first open
    return endpoint


# ---------------------------------------------------------------- opens (#20 item 1)


async def test_stray_opens_hold_no_capacity(stage, stage_nc, client, caplog):
    endpoint = await serve(stage_nc, stage, capacity=4)
    nc = client.nc
    for _ in range(4):  # published, not requested: nobody could be answered
        await nc.publish(open_subject(stage), b"")
    inbox = nc.new_inbox()
    await nc.publish(open_subject(stage), GARBAGE, reply=inbox)
    await nc.publish(open_subject(stage), bus_pb2.OpenStreamRequest().SerializeToString(), reply=inbox)
    await nc.publish(open_subject(stage, "r1"), b"")
    await nc.flush()
    await eventually(lambda: sum("dropped" in r.message or "ignored" in r.message for r in caplog.records) >= 7)
    assert endpoint.active == 0

    # All four slots are still there, and each is given back when its stream ends.
    streams = [await client.open(contract(stage), audio(i + 1)) for i in range(4)]
    for i, stream in enumerate(streams):
        await stream.end()
        assert [r.offset_ms async for r in stream] == [2 * (i + 1)]
    await eventually(lambda: endpoint.active == 0)
    await asyncio.wait_for(endpoint.drain(30), 2)  # nothing held: a SIGTERM'd replica leaves at once
    await endpoint.close()


def test_the_peer_timeout_an_opener_asks_for_is_bounded():
    default = 0.8
    assert bus.peer_timeout(0.0, default) == default  # unset
    assert bus.peer_timeout(math.nan, default) == default
    assert bus.peer_timeout(math.inf, default) == 10.0
    assert bus.peer_timeout(1e30, default) == 10.0
    assert bus.peer_timeout(-5.0, default) == 0.2
    assert bus.peer_timeout(0.001, default) == 0.2
    assert bus.peer_timeout(2.5, default) == 2.5


async def test_an_open_asking_for_an_endless_peer_timeout_gets_the_maximum(stage, stage_nc, client):
    endpoint = await serve(stage_nc, stage)
    nc = client.nc
    request = bus_pb2.OpenStreamRequest(reply_subject=nc.new_inbox(), peer_timeout_seconds=math.inf)
    reply = await nc.request(open_subject(stage), request.SerializeToString(), timeout=2)
    answer = bus_pb2.OpenStreamResponse.FromString(reply.data)
    assert answer.stream_subject
    (held,) = endpoint.streams.values()
    assert held.peer_timeout == 10.0
    await nc.publish(answer.stream_subject, b"", headers={bus.KIND: bus.CANCEL, bus.SEQ: "1"})
    await eventually(lambda: endpoint.active == 0)
    await endpoint.close()


async def test_a_replica_not_ready_stays_out_of_the_queue_group_and_refuses_as_unavailable(stage, stage_nc, client):
    """An LLM replica whose model server is down (#17): no open reaches it through the
    queue group, one sent to it anyway is refused UNAVAILABLE; once ready it serves."""
    ready = False
    endpoint = StageEndpoint(stage_nc, stage, "r1", 4, echo, REQUEST, ready=lambda: ready)
    await endpoint.start()
    await stage_nc.flush()
    with pytest.raises(nats.errors.NoRespondersError):
        await client.nc.request(open_subject(stage), b"", timeout=1)
    with pytest.raises(StageError) as refused:
        await client.open(contract(stage))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "not ready" in refused.value.message

    ready = True
    await endpoint.update_queue_membership()
    await stage_nc.flush()
    async with await client.open(contract(stage), audio(3)) as stream:
        await stream.end()
        assert [output.offset_ms async for output in stream] == [6]

    ready = False  # the server went down again: out of the group at the next check
    await endpoint.update_queue_membership()
    await stage_nc.flush()
    with pytest.raises(nats.errors.NoRespondersError):
        await client.nc.request(open_subject(stage), b"", timeout=1)
    await endpoint.close()


async def test_a_named_open_to_a_busy_replica_goes_to_the_group(stage, stage_nc, client):
    """Affinity (#18) asks the session's last replica by name; one that would queue the
    stream (takes_named false: llama.cpp mid-generation) sends it to the group at once,
    which is no refusal."""
    asked = []

    def takes_named() -> bool:
        asked.append(True)
        return False

    endpoint = StageEndpoint(stage_nc, stage, "r1", 4, echo, REQUEST, takes_named=takes_named)
    await endpoint.start()
    await stage_nc.flush()
    async with await client.open(contract(stage), audio(2), replica="r1") as stream:
        await stream.end()
        assert [output.offset_ms async for output in stream] == [4]
    assert asked == [True]  # asked once, for the named open; the group's open was taken
    assert endpoint.stats.opens_refused == 0 and endpoint.stats.streams_served == 1
    await endpoint.close()


# ---------------------------------------------------------------- malformed messages (#20 item 9)


async def test_garbage_on_the_openers_inbox_fails_the_stream_unavailable(stage, stage_nc, client, caplog):
    endpoint = await serve(stage_nc, stage)
    stream = await client.open(contract(stage), audio(1))
    assert (await anext(stream)).offset_ms == 2
    (held,) = endpoint.streams.values()
    await stage_nc.publish(held.out_subject, GARBAGE)  # where the stage's outputs go
    with pytest.raises(StageError) as error:
        await anext(stream)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert "malformed DetectResponse from the bus" in error.value.message
    assert any("malformed" in r.message and r.name == "voicestack.bus" for r in caplog.records)
    await eventually(lambda: endpoint.active == 0)  # the stage's work was stopped
    await endpoint.close()


async def test_garbage_on_the_inbox_of_a_replayed_stage_fails_over_without_a_lost_output(stage, stage_nc, client):
    endpoint = await serve(stage_nc, stage)
    stream = await client.open(contract(stage, Failover.REPLAY), audio(1))
    await stream.send(audio(2))
    assert (await anext(stream)).offset_ms == 2
    (held,) = endpoint.streams.values()
    await stage_nc.publish(held.out_subject, GARBAGE)
    await stream.end()
    assert [r.offset_ms async for r in stream] == [4]  # the second output, once
    assert stream.failovers == 1
    await endpoint.close()


async def test_garbage_on_the_stages_stream_subject_fails_it_unavailable(stage, stage_nc, client, caplog):
    endpoint = await serve(stage_nc, stage)
    stream = await client.open(contract(stage), audio(1))
    assert (await anext(stream)).offset_ms == 2
    await client.nc.publish(stream._peer.out_subject, GARBAGE)  # where the stage's inputs come from
    with pytest.raises(StageError) as error:
        await anext(stream)
    # The bus is at fault, not the client: never INVALID_ARGUMENT.
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert "malformed DetectRequest from the bus" in error.value.message
    assert any("malformed DetectRequest" in r.message and r.name == "voicestack.bus" for r in caplog.records)
    await eventually(lambda: endpoint.active == 0)
    assert endpoint.stats.errors == 1
    await endpoint.close()


# ---------------------------------------------------------------- failover, lifetimes


async def test_a_stream_fails_over_at_most_max_failovers_times(stage, stage_nc, client):
    attempts = []

    async def model_server_down(requests, context):
        async for _ in requests:
            attempts.append(context.stream_id)
            raise unavailable("the model server is down")
        yield RESPONSE()

    endpoint = await serve(stage_nc, stage, handler=model_server_down)
    stream = await client.open(contract(stage, Failover.REPLAY), audio(1))
    with pytest.raises(StageError) as error:
        await anext(stream)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert "model server is down" in error.value.message
    assert len(attempts) == 1 + MAX_FAILOVERS and stream.failovers == MAX_FAILOVERS
    await eventually(lambda: endpoint.active == 0)
    await endpoint.close()


async def test_async_with_cancels_a_stream_left_open(stage, stage_nc, client):
    endpoint = await serve(stage_nc, stage)
    async with await client.open(contract(stage), audio(1)) as stream:
        assert stream.replica_id == "r1"
        assert (await anext(stream)).offset_ms == 2
        assert endpoint.active == 1
    await eventually(lambda: endpoint.active == 0)
    assert endpoint.stats.streams_cancelled == 1
    await stream.cancel()  # idempotent

    async with await client.open(contract(stage), audio(1)) as stream:  # one that ended is not cancelled
        await stream.end()
        assert [r.offset_ms async for r in stream] == [2]
    await eventually(lambda: endpoint.stats.streams_served == 1)
    assert endpoint.stats.streams_cancelled == 1
    await endpoint.close()


async def test_drain_lets_streams_finish_until_the_deadline_then_stops_them(stage, stage_nc, client):
    endpoint = await serve(stage_nc, stage)
    finishing = await client.open(contract(stage), audio(1))
    lingering = await client.open(contract(stage), audio(2))
    assert (await anext(lingering)).offset_ms == 4
    drain = asyncio.create_task(endpoint.drain(0.5))
    await asyncio.sleep(0.1)
    with pytest.raises(StageError) as refused:  # a draining replica takes no new stream
        await client.open(contract(stage))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    await finishing.end()
    assert [r.offset_ms async for r in finishing] == [2]
    assert not drain.done()  # still waiting for the other one
    started = time.monotonic()
    with pytest.raises(StageError) as stopped:
        await anext(lingering)
    assert stopped.value.code == grpc.StatusCode.UNAVAILABLE and "stopped" in stopped.value.message
    await asyncio.wait_for(drain, 2)
    assert time.monotonic() - started < 1.0
    assert endpoint.active == 0
    await endpoint.close()


# ---------------------------------------------------------------- a stage served both ways (#20 items 8, 13)


class EchoStage(Stage):
    """A stage's shape without a model: a config first, then one output per audio chunk."""

    request_type = REQUEST
    grpc_service_names = ["voicestack.v1.VadService"]

    def __init__(self, name: str, settings: Settings):
        super().__init__(settings)
        self.name = name

    async def stream(self, requests, context):
        await first_message(requests, "config", "a VadConfig")
        async for request in requests:
            yield RESPONSE(offset_ms=len(request.audio.pcm))

    def add_to_grpc(self, server) -> None:
        vad_pb2_grpc.add_VadServiceServicer_to_server(EchoServicer(self), server)


class EchoServicer(vad_pb2_grpc.VadServiceServicer):
    def __init__(self, stage: EchoStage):
        self.stage = stage

    async def Detect(self, request_iterator, context):
        async for response in self.stage.serve_grpc(request_iterator, context):
            yield response


@pytest.fixture
async def echo_stage(stage, stage_nc):
    """(the stage, a gRPC stub of it): one replica with capacity 4, on NATS and on gRPC."""
    served = EchoStage(stage, Settings(capacity=4, replica_id="r1"))
    await served.start(stage_nc, None)
    await stage_nc.flush()
    server = grpc.aio.server()
    served.add_to_grpc(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield served, vad_pb2_grpc.VadServiceStub(channel)
    await served.drain(1)
    await server.stop(0)


def burst(first, count: int = 50):
    """A client that sends everything at once (a file, a replay): requests in flight when refused."""
    async def requests():
        yield first
        for _ in range(count - 1):
            yield audio(1600)
    return requests()


async def status_of(call) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_grpc_and_nats_streams_count_against_one_capacity(echo_stage, client):
    served, stub = echo_stage
    release = asyncio.Event()

    async def idle():
        yield CONFIG
        await release.wait()

    calls = [stub.Detect(idle()) for _ in range(4)]
    await eventually(lambda: served.active == 4)

    # Full: out of the queue group, and an open over NATS is refused as busy.
    with pytest.raises(nats.errors.NoRespondersError):
        await client.nc.request(open_subject(served.name), b"", timeout=1)
    with pytest.raises(StageError) as busy:
        await client.open(contract(served.name))
    assert busy.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await status_of(stub.Detect(burst(CONFIG))) == grpc.StatusCode.RESOURCE_EXHAUSTED

    release.set()
    assert [await status_of(call) for call in calls] == [grpc.StatusCode.OK] * 4
    await eventually(lambda: served.active == 0)

    # And the other way round: streams over NATS fill the replica for gRPC callers too.
    streams = [await client.open(contract(served.name), CONFIG) for _ in range(4)]
    assert served.active == 4
    assert await status_of(stub.Detect(burst(CONFIG))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for stream in streams:
        await stream.cancel()
    await eventually(lambda: served.active == 0)
    assert await status_of(stub.Detect(burst(CONFIG, 3))) == grpc.StatusCode.OK


async def test_a_refusal_reaches_a_bursting_grpc_client_as_itself(echo_stage):
    """grpc/grpc#36066: ended while requests are in flight, a call's status turned into
    INTERNAL ("Internal error from Core") at the client most of the time."""
    _, stub = echo_stage
    bad_first = audio(1600)  # audio before the config
    codes = [await status_of(stub.Detect(burst(bad_first))) for _ in range(10)]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 10
