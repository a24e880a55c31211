"""The WebRTC gateway: a browser talks to the agent.

    browser ══WebRTC (Opus audio + a data channel)══▶ gateway ══gRPC Converse══▶ edge

The gateway serves a plain page (static/) and one signalling endpoint: POST /offer takes the
browser's SDP offer (ICE gathered, no trickle) and answers with its own. Each peer connection
is one Converse stream to the edge:

- browser microphone (Opus, decoded by aiortc) -> 16 kHz mono PCM16, 20 ms AudioFrames -> edge;
  while no microphone audio arrives (not connected yet, a stalled track) silence keeps the
  edge's clock going, as the Converse protocol asks of a live microphone;
- AgentAudio (24 kHz PCM16) -> an outgoing audio track, paced in real time by aiortc's sender,
  silence when there is nothing to play; `Interrupted` drops the queued agent audio;
- events (speech, transcripts, agent text, metrics, traces, errors, connection state) -> the
  page over the "events" data channel, as JSON.

PlaybackPosition: the gateway reports it itself, from its own pacing (the agent audio its track
has handed to the encoder, per turn, every 100 ms and when a turn's audio runs out). The page
cannot tell where one turn's audio ends inside the WebRTC stream; what the gateway's figure
leaves out is the network and the browser's jitter buffer (tens of ms on loopback).

Auth: with an API key for the edge (env VOICESTACK_API_KEY only, never a flag), the page first
gets a short-lived, single-use token (POST /token: HMAC-signed with a secret made at start) and
sends it with the offer; the key itself never leaves the gateway. The gateway is a backend for
the page: put the application's own user login in front of /token.

Drain: on SIGTERM/SIGINT new offers get 503 while the open calls go on, up to drain_seconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import signal
import ssl
import time
from collections import deque
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import av
import grpc
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from google.protobuf import json_format

from voicestack import telemetry
from voicestack.audio import PIPELINE_RATE
from voicestack.client import edge_channel, edge_metadata
from voicestack.config import Settings, edge_api_key, public_view
from voicestack.v1 import audio_pb2, edge_pb2, edge_pb2_grpc

log = logging.getLogger("voicestack.web")

STATIC_DIR = Path(__file__).parent / "static"
FRAME_MS = 20
MIC_FRAME_BYTES = PIPELINE_RATE * FRAME_MS // 1000 * 2  # 20 ms of 16 kHz PCM16
PLAYOUT_RATE = 48000  # the outgoing track's rate: Opus's own, so aiortc's encoder only upmixes
PLAYOUT_SAMPLES = PLAYOUT_RATE * FRAME_MS // 1000
MIC_STALL_SECONDS = 0.2  # no microphone audio this long: silence goes to the edge instead
PLAYBACK_REPORT_MS = 100  # a PlaybackPosition per this much agent audio played
AUDIBLE = 655  # |sample| over 2% of full scale: a turn's audio is audible from here (latency marks)
MAX_OFFER_BYTES = 64 * 1024  # an SDP offer is a few kB
MAX_PAGE_MESSAGE_BYTES = 4096
SESSION_START_SECONDS = 15.0  # the edge answers SessionStarted within this, or the offer fails
CONNECT_SECONDS = 30.0  # an answered peer connection that never connects is closed
OUTBOX_FRAMES = 250  # 5 s of microphone audio waiting for the edge; beyond it frames are dropped
PENDING_EVENTS = 1000  # events held for a data channel not open yet


def ice_servers(settings: Settings) -> list[str]:
    return [u.strip() for u in settings.web_ice_servers.split(",") if u.strip()]


def check_settings(settings: Settings) -> Settings:
    """The web_* settings that cannot work, refused at start (SystemExit, like config.py)."""
    if settings.web_capacity < 1:
        raise SystemExit("config: web_capacity must be at least 1")
    if settings.web_token_ttl_seconds <= 0:
        raise SystemExit("config: web_token_ttl_seconds must be above 0")
    if settings.web_tls_key_file and not settings.web_tls_cert_file:
        raise SystemExit("config: web_tls_key_file needs web_tls_cert_file")
    if bool(settings.web_edge_cert_file) != bool(settings.web_edge_key_file):
        raise SystemExit("config: set both web_edge_cert_file and web_edge_key_file (or neither)")
    for url in ice_servers(settings):
        if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
            raise SystemExit(f"config: web_ice_servers: {url!r} is not a stun:/turn: URL")
    return settings


# ---------------------------------------------------------------- tokens

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """Short-lived single-use tokens: `nonce.expiry_ms.signature`, HMAC-SHA256 with a secret
    made at start (a restart invalidates them all; replicas do not share them, so a load
    balancer in front of several gateways needs session affinity from /token to /offer)."""

    def __init__(self, ttl_seconds: float, clock=time.time):
        self.ttl = ttl_seconds
        self.clock = clock
        self._secret = secrets.token_bytes(32)
        self._used: dict[str, float] = {}  # nonce -> expiry (kept until it expires)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def issue(self) -> str:
        payload = f"{secrets.token_urlsafe(18)}.{int((self.clock() + self.ttl) * 1000)}"
        return f"{payload}.{self._sign(payload)}"

    def redeem(self, token) -> str | None:
        """None if the token is good (it is then used up), else why not."""
        if not token:
            return "a token is required: POST /token first and send its token with the offer"
        if not isinstance(token, str) or token.count(".") != 2 or len(token) > 200:
            return "the token is malformed: get a new one from POST /token"
        nonce, expiry, signature = token.split(".")
        if not hmac.compare_digest(self._sign(f"{nonce}.{expiry}"), signature):
            return "the token is not valid (not issued by this gateway, or it restarted): get a new one"
        now = self.clock()
        for old in [n for n, exp in self._used.items() if exp < now]:
            del self._used[old]
        if int(expiry) / 1000 < now:
            return f"the token expired (tokens last {self.ttl:g} s): get a new one from POST /token"
        if nonce in self._used:
            return "the token was already used (each token opens one call): get a new one"
        self._used[nonce] = int(expiry) / 1000
        return None


# ---------------------------------------------------------------- agent audio out

class AgentAudioTrack(MediaStreamTrack):
    """The agent's voice as a WebRTC track: 20 ms frames at 48 kHz, in real time (aiortc
    encodes each as Opus as it is returned), silence when nothing is queued."""

    kind = "audio"

    def __init__(self, on_played=None):
        super().__init__()
        self._chunks: deque[list] = deque()  # [turn, bytearray of 48 kHz PCM16, queued at]
        self._resampler = None
        self._rate = 0
        self._start: float | None = None
        self._pts = 0
        self.played_ms: dict[int, float] = {}
        self._reported_ms: dict[int, float] = {}
        self._audible: set[int] = set()  # turns whose first audible frame has gone out
        self.on_played = on_played  # (event, **fields) -> None: "position" and "started"
        self.dropped_ms = 0.0

    def enqueue(self, turn: int, pcm: bytes, rate: int) -> None:
        if not pcm:
            return
        if self._resampler is None or rate != self._rate:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=PLAYOUT_RATE)
            self._rate = rate
        frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        frame.planes[0].update(pcm[: len(pcm) // 2 * 2])
        frame.sample_rate = rate
        data = b"".join(out.to_ndarray().tobytes() for out in self._resampler.resample(frame))
        if self._chunks and self._chunks[-1][0] == turn:
            self._chunks[-1][1] += data
        else:
            self._chunks.append([turn, bytearray(data), time.monotonic()])

    def drop(self, turn: int | None = None) -> float:
        """Forget the queued audio (of one turn, or all); returns how many ms were dropped."""
        kept, dropped = deque(), 0
        for chunk in self._chunks:
            if turn is None or chunk[0] == turn:
                dropped += len(chunk[1])
            else:
                kept.append(chunk)
        self._chunks = kept
        ms = dropped / 2 / PLAYOUT_RATE * 1000
        self.dropped_ms += ms
        return ms

    @property
    def queued_ms(self) -> float:
        return sum(len(c[1]) for c in self._chunks) / 2 / PLAYOUT_RATE * 1000

    def _take(self) -> bytes:
        want = PLAYOUT_SAMPLES * 2
        if not self._chunks:
            return bytes(want)
        turn, data, queued_at = self._chunks[0]
        piece = bytes(data[:want])
        del data[:want]
        if turn not in self.played_ms:
            self.played_ms[turn] = 0.0
            if self.on_played:
                waited_ms = round((time.monotonic() - queued_at) * 1000, 1)
                self.on_played("started", turn_index=turn, gateway_queue_ms=waited_ms)
        if turn not in self._audible and piece and max(abs(v) for v in memoryview(piece).cast("h")) > AUDIBLE:
            self._audible.add(turn)
            if self.on_played:
                self.on_played("audible", turn_index=turn, offset_ms=round(self.played_ms[turn]))
        self.played_ms[turn] += len(piece) / 2 / PLAYOUT_RATE * 1000
        finished = not data
        if finished:
            self._chunks.popleft()
        if self.on_played and (finished or self.played_ms[turn] - self._reported_ms.get(turn, 0) >= PLAYBACK_REPORT_MS):
            self._reported_ms[turn] = self.played_ms[turn]
            self.on_played("position", turn_index=turn, played_ms=int(self.played_ms[turn]))
        return piece + bytes(want - len(piece))  # a turn's last frame ends in silence

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += PLAYOUT_SAMPLES
            await asyncio.sleep(max(0.0, self._start + self._pts / PLAYOUT_RATE - time.monotonic()))
        frame = av.AudioFrame(format="s16", layout="mono", samples=PLAYOUT_SAMPLES)
        frame.planes[0].update(self._take())
        frame.pts = self._pts
        frame.sample_rate = PLAYOUT_RATE
        frame.time_base = Fraction(1, PLAYOUT_RATE)
        return frame


# ---------------------------------------------------------------- one call

class EdgeRefused(Exception):
    def __init__(self, http_status: int, message: str):
        super().__init__(message)
        self.http_status, self.message = http_status, message


def event_json(kind: str, body) -> dict:
    data = json_format.MessageToDict(body, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    data["type"] = kind
    return data


class Call:
    """One browser peer connection bridged to one Converse stream."""

    _ids = itertools.count(1)

    def __init__(self, gateway: Gateway, pc: RTCPeerConnection):
        self.gateway = gateway
        self.pc = pc
        self.id = f"c{next(self._ids)}-{secrets.token_hex(3)}"
        self.channel = None
        self.pending: deque[str] = deque(maxlen=PENDING_EVENTS)
        self.player = AgentAudioTrack(on_played=self._on_played)
        self.outbox: asyncio.Queue = asyncio.Queue(OUTBOX_FRAMES)
        self.started = asyncio.get_running_loop().create_future()
        self.started.add_done_callback(lambda f: f.cancelled() or f.exception())  # (read, whoever waits)
        self.session_id = ""
        self.output_rate = 24000
        self.grpc_call = None
        self.tasks: list[asyncio.Task] = []
        self.closed = False
        self.mic_frames = 0
        self.mic_dropped = 0
        self.ended = asyncio.Event()
        self.opened_at = time.monotonic()

    # -- page events

    def send_event(self, event: dict) -> None:
        text = json.dumps(event, separators=(",", ":"))
        if self.channel is not None and self.channel.readyState == "open":
            while self.pending:
                self.channel.send(self.pending.popleft())
            self.channel.send(text)
        else:
            self.pending.append(text)

    def on_datachannel(self, channel) -> None:
        self.channel = channel

        @channel.on("message")
        def on_message(message):
            self._on_page_message(message)

        @channel.on("open")
        def on_open():
            self.send_event({"type": "hello", "call_id": self.id})

        if channel.readyState == "open":
            self.send_event({"type": "hello", "call_id": self.id})

    def _on_page_message(self, message) -> None:
        if not isinstance(message, str) or len(message) > MAX_PAGE_MESSAGE_BYTES:
            return
        try:
            data = json.loads(message)
        except ValueError:
            return
        if isinstance(data, dict) and data.get("type") == "hangup":
            self.spawn(self.close("the caller hung up"))
        # PlaybackPosition comes from the gateway's own pacing (see the module docstring);
        # anything else from the page is ignored.

    def _on_played(self, what: str, **fields) -> None:
        if what == "position":
            self._put(edge_pb2.ConverseRequest(playback=edge_pb2.PlaybackPosition(**fields)))
        else:  # "started": a turn's first frame went out; "audible": its first loud one
            self.send_event({"type": f"playout_{what}", **fields})

    # -- microphone in

    def _put(self, request) -> None:
        try:
            self.outbox.put_nowait(request)
        except asyncio.QueueFull:  # the edge stopped reading: drop, never buffer without bound
            self.mic_dropped += 1

    async def pump_microphone(self, track) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=PIPELINE_RATE)
        buffer = bytearray()
        while not self.closed:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            for out in resampler.resample(frame):
                buffer += out.to_ndarray().tobytes()
            while len(buffer) >= MIC_FRAME_BYTES:
                self._put(edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=bytes(buffer[:MIC_FRAME_BYTES]))))
                del buffer[:MIC_FRAME_BYTES]
                self.mic_frames += 1

    async def _requests(self):
        config = edge_pb2.SessionConfig(input_format=audio_pb2.AudioFormat(
            encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=PIPELINE_RATE, channels=1))
        yield edge_pb2.ConverseRequest(config=config)
        quiet = edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=bytes(MIC_FRAME_BYTES)))
        while not self.closed:
            try:
                request = await asyncio.wait_for(self.outbox.get(), MIC_STALL_SECONDS)
            except TimeoutError:
                # No microphone audio for a while: the edge still hears time pass.
                for _ in range(int(MIC_STALL_SECONDS * 1000 // FRAME_MS)):
                    yield quiet
                continue
            if request is None:
                return
            yield request

    # -- the edge

    async def start(self) -> None:
        """Open the Converse stream and wait for SessionStarted (raises EdgeRefused)."""
        gateway = self.gateway
        metadata = edge_metadata(gateway.api_key)
        self.grpc_call = edge_pb2_grpc.EdgeServiceStub(gateway.channel()).Converse(self._requests(), metadata=metadata)
        self.spawn(self._read_edge())
        try:
            await asyncio.wait_for(asyncio.shield(self.started), SESSION_START_SECONDS)
        except TimeoutError:
            raise EdgeRefused(504, f"the edge did not start a session within {SESSION_START_SECONDS:g} s") from None

    async def _read_edge(self) -> None:
        status, details = grpc.StatusCode.OK, ""
        try:
            async for event in self.grpc_call:
                self._on_edge_event(event)
        except grpc.aio.AioRpcError as error:
            status, details = error.code(), error.details() or ""
        except asyncio.CancelledError:
            status, details = grpc.StatusCode.CANCELLED, "the call was closed"
        finally:
            if not self.started.done():
                self.started.set_exception(refusal(status, details))
            elif not self.closed:
                self.send_event({"type": "call_ended", "code": status.name, "message": details
                                 or ("the agent ended the call" if status == grpc.StatusCode.OK else "")})
                log.info("call %s: the edge ended it: %s %s", self.id, status.name, details)
                self.spawn(self.close(f"edge ended the call ({status.name})", linger=1.0))

    def _on_edge_event(self, event: edge_pb2.ConverseResponse) -> None:
        kind = event.WhichOneof("kind")
        body = getattr(event, kind)
        if kind == "session_started":
            self.session_id, self.output_rate = body.session_id, body.output_sample_rate_hz or 24000
            if not self.started.done():
                self.started.set_result(None)
        elif kind == "agent_audio":
            self.player.enqueue(body.turn_index, body.audio.pcm, body.audio.sample_rate_hz or self.output_rate)
            return  # audio goes by the track, not the data channel
        elif kind == "interrupted":
            dropped = self.player.drop(body.turn_index)
            self.send_event({**event_json(kind, body), "gateway_dropped_ms": round(dropped)})
            return
        elif kind == "tool_call":  # the page declares no tools; answer rather than let it time out
            self._put(edge_pb2.ConverseRequest(tool_result=edge_pb2.ToolResult(
                call_id=body.id, error="the web gateway runs no client tools")))
        self.send_event(event_json(kind, body))

    # -- lifecycle

    def spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self.tasks.append(task)
        task.add_done_callback(lambda t: self.tasks.remove(t) if t in self.tasks else None)
        return task

    async def watch_connection(self) -> None:
        """Close a call whose browser never connects."""
        await asyncio.sleep(CONNECT_SECONDS)
        if self.pc.connectionState != "connected" and not self.closed:
            await self.close(f"the browser did not connect within {CONNECT_SECONDS:g} s")

    async def close(self, reason: str = "", linger: float = 0.0) -> None:
        if self.closed:
            return
        if linger:
            await asyncio.sleep(linger)  # the data channel delivers the last events first
            if self.closed:
                return
        self.closed = True
        log.info("call %s closed: %s (mic frames %d, dropped %d, agent audio dropped %.0f ms)",
                 self.id, reason, self.mic_frames, self.mic_dropped, self.player.dropped_ms)
        with contextlib.suppress(asyncio.QueueFull):
            self.outbox.put_nowait(None)
        if self.grpc_call is not None:
            self.grpc_call.cancel()
        self.player.stop()
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()
        with contextlib.suppress(Exception):
            await self.pc.close()
        self.gateway.calls.discard(self)
        self.ended.set()


def refusal(status: grpc.StatusCode, details: str) -> EdgeRefused:
    """The edge refused to start a session: what the page is told."""
    if status == grpc.StatusCode.UNAUTHENTICATED:
        # The gateway's key is wrong: the operator's problem, not the caller's.
        return EdgeRefused(502, "the gateway is not allowed to use the agent (its API key was refused)")
    if status in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        return EdgeRefused(503, f"the agent is not available now: {details or status.name}; try again shortly")
    return EdgeRefused(502, f"the agent refused the call: {status.name} {details}".strip())


# ---------------------------------------------------------------- the gateway

def json_error(status: int, message: str, **headers) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "media-src 'self' blob: mediastream:; connect-src 'self'; frame-ancestors 'none'")


@web.middleware
async def security_headers(request, handler):
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Cache-Control", "no-store")
    # The page's policy, on every response (a FileResponse's type is not known here yet).
    response.headers.setdefault("Content-Security-Policy", CSP)
    return response


class Gateway:
    def __init__(self, settings: Settings, api_key: str = "", meters: telemetry.Meters | None = None):
        self.settings = settings
        self.meters = meters  # telemetry.setup's, in `serve web`: calls refused here count as opens refused
        self.api_key = api_key  # for the edge only: never sent to the page, never logged
        self.tokens = TokenIssuer(settings.web_token_ttl_seconds)
        self.calls: set[Call] = set()
        self.draining = False
        self._channel = None
        self.served = 0
        self.refused = 0

    @property
    def token_required(self) -> bool:
        return bool(self.api_key)

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            s = self.settings
            self._channel = edge_channel(s.web_edge_address, s.web_edge_ca_file, s.web_edge_cert_file,
                                         s.web_edge_key_file)
        return self._channel

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_OFFER_BYTES, middlewares=[security_headers])
        app.router.add_get("/", self.index)
        app.router.add_get("/config", self.config)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_post("/token", self.token)
        app.router.add_post("/offer", self.offer)
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
        app.on_cleanup.append(lambda _app: self.close())
        return app

    # -- HTTP

    async def index(self, request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def config(self, request) -> web.Response:
        return web.json_response({"ice_servers": [{"urls": u} for u in ice_servers(self.settings)],
                                  "token_required": self.token_required})

    async def healthz(self, request) -> web.Response:
        body = {"status": "draining" if self.draining else "serving", "calls": len(self.calls),
                "capacity": self.settings.web_capacity}
        return web.json_response(body, status=503 if self.draining else 200)

    def _origin_allowed(self, request) -> bool:
        origin = request.headers.get("Origin")
        if not origin:  # not a browser's cross-site request (curl, a test, a same-origin GET)
            return True
        allowed = {o.strip().rstrip("/") for o in self.settings.web_allowed_origins.split(",") if o.strip()}
        if origin.rstrip("/") in allowed:
            return True
        return urlsplit(origin).netloc == request.host

    async def token(self, request) -> web.Response:
        if not self._origin_allowed(request):
            return json_error(403, "tokens are given to the gateway's own page only (see web_allowed_origins)")
        if self.draining:
            return json_error(503, "the gateway is shutting down: try again shortly", **{"Retry-After": "5"})
        return web.json_response({"token": self.tokens.issue(), "expires_in": self.settings.web_token_ttl_seconds,
                                  "required": self.token_required})

    async def offer(self, request) -> web.Response:
        if not self._origin_allowed(request):
            return json_error(403, "offers are taken from the gateway's own page only (see web_allowed_origins)")
        if self.draining:
            self._refuse()
            return json_error(503, "the gateway is shutting down: try again shortly", **{"Retry-After": "5"})
        if len(self.calls) >= self.settings.web_capacity:
            self._refuse()
            return json_error(503, f"the gateway is at capacity ({self.settings.web_capacity} calls): "
                                   "try again shortly",
                              **{"Retry-After": "5"})
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"the offer is over {MAX_OFFER_BYTES} bytes")
        except ValueError:
            return json_error(400, 'the body must be JSON: {"type": "offer", "sdp": "...", "token": "..."}')
        if not isinstance(body, dict):
            return json_error(400, 'the body must be a JSON object: {"type": "offer", "sdp": "...", "token": "..."}')
        token = body.get("token") or request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if self.token_required and (why := self.tokens.redeem(token)):
            return json_error(401, why)
        sdp = body.get("sdp")
        if body.get("type") != "offer":
            return json_error(400, 'type must be "offer"')
        if not isinstance(sdp, str) or not sdp.startswith("v=0"):
            return json_error(400, "sdp must be an SDP offer (text starting with v=0)")
        if "m=audio" not in sdp:
            return json_error(400, "the SDP offer has no audio: add the microphone track before creating the offer")
        if "m=application" not in sdp:
            return json_error(400, 'the SDP offer has no data channel: create one ("events") before the offer')

        ice = [RTCIceServer(urls=u) for u in ice_servers(self.settings)]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        call = Call(self, pc)
        self.calls.add(call)  # holds its place from here, so concurrent offers see it
        try:
            return await self._answer(call, pc, sdp)
        except EdgeRefused as refused:
            self.refused += 1
            await call.close(f"edge refused: {refused.message}")
            return json_error(refused.http_status, refused.message,
                              **({"Retry-After": "5"} if refused.http_status == 503 else {}))
        except BadOffer as bad:
            await call.close(f"bad offer: {bad}")
            return json_error(400, str(bad))
        except BaseException:
            await call.close("gateway error")
            raise

    def _refuse(self) -> None:
        """A call refused by this gateway (at capacity or draining): voicestack_stream_opens_refused_total{stage="web"}."""
        self.refused += 1
        if self.meters:
            self.meters.opens_refused.add(1, {"stage": "web"})

    async def _answer(self, call: Call, pc: RTCPeerConnection, sdp: str) -> web.Response:
        @pc.on("datachannel")
        def on_datachannel(channel):
            call.on_datachannel(channel)

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                call.spawn(call.pump_microphone(track))

        @pc.on("connectionstatechange")
        async def on_state():
            state = pc.connectionState
            call.send_event({"type": "connection", "state": state})
            log.info("call %s: connection %s", call.id, state)
            if state in ("failed", "closed"):
                await call.close(f"connection {state}")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as error:  # noqa: BLE001 - aiortc raises many kinds for a bad SDP
            raise BadOffer(f"the SDP offer could not be used: {type(error).__name__}: {error}") from None
        pc.addTrack(call.player)
        await call.start()  # the edge's refusal is the page's answer, before any media flows
        try:
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception as error:  # noqa: BLE001
            raise BadOffer(f"no answer fits the SDP offer: {type(error).__name__}: {error}") from None
        call.spawn(call.watch_connection())
        self.served += 1
        log.info("call %s: session %s open (%d calls)", call.id, call.session_id, len(self.calls))
        return web.json_response({"type": pc.localDescription.type, "sdp": pc.localDescription.sdp,
                                  "call_id": call.id, "session_id": call.session_id})

    # -- shutdown

    async def drain(self, seconds: float) -> None:
        """Refuse new calls, let the open ones go on up to `seconds`, then end them."""
        self.draining = True
        deadline = time.monotonic() + seconds
        for call in list(self.calls):
            call.send_event({"type": "go_away", "reason": "the gateway is shutting down",
                             "deadline_ms": int(seconds * 1000)})
        if self.calls:
            log.info("draining: %d open calls, up to %.0f s", len(self.calls), seconds)
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.close()

    async def close(self) -> None:
        calls = list(self.calls)
        for call in calls:
            call.send_event({"type": "call_ended", "code": "UNAVAILABLE", "message": "the gateway shut down"})
        if calls:
            await asyncio.sleep(0.5)  # the data channels deliver that first
        for call in calls:
            await call.close("gateway shut down")
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class BadOffer(Exception):
    pass


# ---------------------------------------------------------------- process

async def serve(settings: Settings, api_key: str = "", ready=None) -> None:
    """Run until SIGTERM/SIGINT, then drain: new offers get 503, open calls go on up to
    drain_seconds. Prometheus metrics on settings.metrics_port (as the stages: calls in flight and
    capacity as voicestack_streams_active / _capacity{stage="web"}, the autoscaling signal)."""
    meters = telemetry.setup("web", settings.metrics_port, settings.web_host)
    gateway = Gateway(settings, api_key, meters)
    meters.observe_streams(lambda: len(gateway.calls), lambda: settings.web_capacity)
    runner = web.AppRunner(gateway.app(), handle_signals=False, access_log=None)
    await runner.setup()
    context = None
    if settings.web_tls_cert_file:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.web_tls_cert_file, settings.web_tls_key_file or None)
    site = web.TCPSite(runner, settings.web_host, settings.web_port, ssl_context=context)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if context else "http"
    log.info("ready on %s://%s:%d/ (edge %s, tokens %s, metrics port %d)", scheme, settings.web_host,
             settings.web_port, settings.web_edge_address, "required" if gateway.token_required else "optional",
             settings.metrics_port)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("SIGTERM: new calls get 503, open ones have %.0f s", settings.drain_seconds)
    await gateway.drain(settings.drain_seconds)
    await runner.cleanup()
    telemetry.shutdown()
    log.info("stopped (%d calls served, %d refused)", gateway.served, gateway.refused)


def run(settings: Settings) -> None:
    """`voicestack serve web`: the process's event loop starts here. The edge's API key comes
    from VOICESTACK_API_KEY only (config.edge_api_key)."""
    check_settings(settings)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s web %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    view = {k: v for k, v in public_view(settings).items()
            if k.startswith("web_") or k in ("metrics_port", "drain_seconds", "log_level")}
    log.info("starting with %s", json.dumps(view))  # (secrets masked; the API key is no setting)
    asyncio.run(serve(settings, edge_api_key()))
