"""How every service process runs: telemetry, NATS, a gRPC server with health and
reflection, and a graceful drain on SIGTERM. A service supplies only its own parts:

    class Service(Protocol):
        name: str                       # "edge", "vad", ...
        grpc_service_names: list[str]   # full names, for health and reflection
        def add_to_grpc(self, server) -> None
        async def start(self, nc, meters) -> None   # NATS endpoints
        async def drain(self, deadline_seconds: float) -> None
        active: int; capacity: int      # streams in flight, and the most it takes
        def describe(self) -> dict      # model, device: for `voicestack up` and status
        def snapshot(self) -> dict      # live numbers, announced on NATS (discovery.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from typing import AsyncIterator

import grpc
import nats
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from voicestack import bus_permissions, discovery, telemetry
from voicestack.config import Settings, public_view

log = logging.getLogger(__name__)

# Deliberate bounds: a 100 ms frame at 48 kHz is 9.6 kB; nothing legitimate is near 4 MiB.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# How long a refused or failed gRPC call's remaining requests are read before its status
# is sent (see end_call): a burst is read in milliseconds, live audio is cut here.
END_CALL_READ_SECONDS = 1.0


async def end_call(context: grpc.aio.ServicerContext, requests: AsyncIterator, code: grpc.StatusCode,
                   message: str) -> None:
    """End a gRPC call with a status its client is sure to get.

    Ended while the client is still sending (`context.abort()` mid-stream), a grpc.aio
    client's next write fails, and that failure replaces the status with INTERNAL
    "Internal error from Core" (grpc/grpc#36066). So read what it still sends first, for
    a bounded time (a live audio stream never stops by itself), then set the status."""
    with contextlib.suppress(Exception):  # (TimeoutError, or the call already gone)
        async with asyncio.timeout(END_CALL_READ_SECONDS):
            async for _ in requests:
                pass
    context.set_code(code)
    context.set_details(message)


async def connect_nats(settings: Settings, name: str):
    """NATS connection that reconnects for ever, with bounded backoff."""
    options = dict(
        servers=settings.nats_servers(), name=name, max_reconnect_attempts=-1,
        reconnect_time_wait=0.5, connect_timeout=2.0, allow_reconnect=True,
    )
    # Its role's user and password (bus_permissions.py), or a .creds file; the servers' CA.
    options.update(bus_permissions.connect_options(settings))

    async def on_error(exc):
        log.warning("nats: %s", exc)

    async def on_disconnect():
        if not nc.is_closed:  # (our own close at shutdown is no outage)
            log.warning("nats: disconnected, reconnecting")

    async def on_reconnect():
        log.info("nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

    nc = await nats.connect(
        error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, **options
    )
    return nc


def grpc_credentials(settings: Settings):
    if not settings.tls_cert_file:
        return None
    with open(settings.tls_cert_file, "rb") as cert, open(settings.tls_key_file, "rb") as key:
        pair = (key.read(), cert.read())
    if settings.tls_client_ca_file:  # mTLS: only clients with a certificate from this CA
        with open(settings.tls_client_ca_file, "rb") as ca:
            return grpc.ssl_server_credentials([pair], root_certificates=ca.read(), require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def run(service, settings: Settings) -> None:
    """Run `service` until it has drained: the process's event loop starts here."""
    if settings.uvloop:
        import uvloop  # (settings.uvloop: see config.py)

        uvloop.run(serve(service, settings))
    else:
        asyncio.run(serve(service, settings))


async def serve(service, settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format=f"%(asctime)s {service.name} %(levelname)s %(name)s: %(message)s")
    log.info("starting with %s", json.dumps(public_view(settings)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # Every resource of the process, released in reverse order on the way out (after a
    # SIGTERM, or a failure while starting): the service drains its streams while it is
    # still announced and its gRPC server still serves them; then it leaves the bus, the
    # gRPC server stops, and the NATS connection drains last.
    async with contextlib.AsyncExitStack() as resources:
        meters = telemetry.setup(service.name, settings.metrics_port, settings.grpc_host)
        resources.callback(telemetry.shutdown)
        meters.observe_streams(lambda: service.active, lambda: service.capacity)

        nc = await connect_nats(settings, f"voicestack-{settings.replica_id}")
        resources.push_async_callback(_close_nats, nc)

        server = grpc.aio.server(options=GRPC_OPTIONS)
        resources.push_async_callback(server.stop, 1.0)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        service.add_to_grpc(server)
        reflection.enable_server_reflection(
            [*service.grpc_service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        address = f"{settings.grpc_host}:{settings.grpc_port}"
        credentials = grpc_credentials(settings)
        if credentials:
            server.add_secure_port(address, credentials)
        else:
            server.add_insecure_port(address)

        # `$SRV.*`: what `voicestack status` reads. Announced before the service starts
        # so that it leaves the bus only after the service has drained.
        announcement = await discovery.announce(nc, service)
        resources.push_async_callback(_leave_bus, announcement)

        await service.start(nc, meters)  # its NATS endpoints

        async def drain() -> None:
            announcement.draining = True  # visible on the bus at once, before the drain begins
            log.info("draining for up to %.0fs (%d streams open)", settings.drain_seconds, service.active)
            await health_servicer.enter_graceful_shutdown()
            await service.drain(settings.drain_seconds)

        resources.push_async_callback(drain)

        async def set_health(serving: bool) -> None:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ["", *service.grpc_service_names]:
                await health_servicer.set(name, status)

        # (A stage that is not ready, an LLM whose model server is still loading, says
        # NOT_SERVING until it is: Kubernetes keeps it out of rollouts' counts meanwhile.)
        service.on_readiness = set_health
        await server.start()
        await set_health(getattr(service, "ready", True))
        log.info("ready on %s (%s)", address, json.dumps(service.describe()))

        await stop.wait()
        log.info("SIGTERM: stopping")
    log.info("stopped")


async def _leave_bus(announcement) -> None:
    with contextlib.suppress(Exception):
        await announcement.stop()  # off the bus once its streams are done


async def _close_nats(nc) -> None:
    with contextlib.suppress(Exception):
        await nc.drain()  # subscriptions drained before the connection closes
