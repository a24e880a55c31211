"""The floor under any Python edge: what grpc.aio alone costs per received audio frame.

A bare grpc.aio server with the edge's own Converse method and message types reads N
streams of 20 ms frames at real-time pace and does nothing with them: no session, no
NATS. Its CPU per frame is the least a Python gRPC edge can spend, so
1000 ms / (its CPU ms per session-second) bounds sessions per core from above for
voicestack's edge too, whatever the edge does. Measured on asyncio's loop and on uvloop
(settings.uvloop), and for 20 and 60 ms frames (a client may send 10-100 ms frames).

The server runs in its own process (CPU from /proc), the clients in this one.

  python -m load.grpc_floor --sessions 50 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time

from load.stats import table
from load.system import cpu_seconds

WARMUP_S = 3.0


def _serve(port_queue, loop_kind: str) -> None:
    import grpc

    from voicestack.v1 import edge_pb2

    async def converse(request_iterator, context):
        async for _ in request_iterator:
            pass
        return
        yield  # a server-streaming handler, as the edge's, that never answers

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("voicestack.v1.EdgeService", {
            "Converse": grpc.stream_stream_rpc_method_handler(
                converse, request_deserializer=edge_pb2.ConverseRequest.FromString,
                response_serializer=edge_pb2.ConverseResponse.SerializeToString)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_queue.put(port)
        await server.wait_for_termination()

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


async def _clients(port: int, sessions: int, seconds: float, frame_ms: int) -> None:
    import grpc

    from voicestack.v1 import edge_pb2, edge_pb2_grpc

    frame = edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=bytes(32 * frame_ms)))  # 16 kHz PCM16
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)

        async def session(index: int) -> None:
            await asyncio.sleep(index * frame_ms / 1000 / sessions)  # spread over one frame time

            async def frames():
                began = time.monotonic()
                sent = 0
                while time.monotonic() - began < seconds:
                    yield frame
                    sent += 1
                    await asyncio.sleep(max(0.0, began + sent * frame_ms / 1000 - time.monotonic()))

            async for _ in stub.Converse(frames()):
                pass

        await asyncio.gather(*(session(i) for i in range(sessions)))


def measure(sessions: int, frame_ms: int, loop_kind: str, seconds: float = 10.0) -> dict:
    """Server CPU per frame and per session-second for one configuration."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no gRPC state across fork
    ports = context.Queue()
    server = context.Process(target=_serve, args=(ports, loop_kind), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=30)

        async def run() -> float:
            clients = asyncio.create_task(_clients(port, sessions, WARMUP_S + seconds + 1, frame_ms))
            await asyncio.sleep(WARMUP_S)
            cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
            await asyncio.sleep(seconds)
            cores = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
            await clients
            return cores

        cores = asyncio.run(run())
    finally:
        server.terminate()
        server.join(5)
    per_session_second_ms = cores * 1000 / sessions
    return {
        "sessions": sessions, "frame_ms": frame_ms, "loop": loop_kind, "server_cores": cores,
        "cpu_us_per_frame": per_session_second_ms * frame_ms,
        "cpu_ms_per_session_second": per_session_second_ms,
        "sessions_per_core_at_most": 1000 / per_session_second_ms if per_session_second_ms else float("nan"),
    }


def run(sessions: int = 50, seconds: float = 10.0, configs=(("asyncio", 20), ("uvloop", 20), ("uvloop", 60)),
        progress: bool = True) -> list[dict]:
    results = []
    for loop_kind, frame_ms in configs:
        if progress:
            print(f"grpc floor: {sessions} sessions, {frame_ms} ms frames, {loop_kind}...", file=sys.stderr)
        results.append(measure(sessions, frame_ms, loop_kind, seconds))
    return results


def floor_table(results: list[dict]) -> str:
    return table(["event loop", "frame ms", "sessions", "server cores", "CPU µs per frame", "CPU ms per session-s",
                  "sessions per core, at most"],
                 [[r["loop"], r["frame_ms"], r["sessions"], f"{r['server_cores']:.2f}", f"{r['cpu_us_per_frame']:.0f}",
                   f"{r['cpu_ms_per_session_second']:.1f}", f"{r['sessions_per_core_at_most']:.0f}"] for r in results])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.grpc_floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--seconds", type=float, default=10.0, help="measured window per configuration")
    args = p.parse_args(argv)
    print(floor_table(run(args.sessions, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
