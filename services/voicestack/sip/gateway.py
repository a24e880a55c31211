"""The SIP gateway: answers phone calls and bridges each to one Converse stream on the edge.

    phone/trunk ══SIP (UDP/TCP) + RTP G.711══▶ gateway ══gRPC Converse══▶ edge

What does what, and why:

* SIP messages are parsed and written by **sipmessage** (Spacinov, BSD-2, pure Python, typed
  headers: Via, Address, CSeq, digest Authorization/WWW-Authenticate). The asyncio SIP
  libraries on PyPI were not sound enough to build on: aiosip is abandoned (2017, breaks on
  current asyncio), pyVoIP is a threaded softphone (UAC-first, its own SIP parser, no asyncio),
  sippy is a full threaded B2BUA with its own event loop. So the transport and the UAS
  transactions are this module's own, deliberately small: exactly INVITE (100 Trying, then
  200 OK with the SDP answer, retransmitted until ACK on UDP), ACK, BYE (either side, ours
  retransmitted until answered), CANCEL (200, and 487 for the INVITE), OPTIONS (200 with
  Allow; 503 while draining, for load-balancer probes), INFO (DTMF relay), re-INVITE (same
  answer, new remote address), everything else 405/501. Retransmitted requests get the cached
  response. UDP and TCP (RFC 3261 18: Content-Length framing, CRLF keepalives).
* SDP offer/answer: **sdp-transform** parses and writes; sdp.py chooses PCMU/PCMA and
  telephone-event.
* RTP: **aiortp** (asyncio RTP/RTCP, MIT): packets, SSRC/sequence/timestamps, RTCP reports,
  jitter buffer with loss concealment, the RFC 4733 DTMF receiver, the media clock and the
  G.711 codecs (numpy lookup tables: no audioop, which 3.13 removed). See media.py.
* Digest auth: digest.py (hashes per RFC 2617/7616/8760, headers by sipmessage).

One call:
  INVITE -> offer checked (488 if nothing to answer), capacity (486/503) and drain (503)
  checked, RTP port taken from sip_rtp_ports, 100 Trying, the Converse stream opened with
  the call's SessionConfig (8 kHz PCM16 input); SessionStarted -> 200 OK (a refusal by the
  edge -> 503, or 403 when the edge wants an API key). Caller audio -> AudioFrames (silence
  when RTP stalls, so the edge never idles out); AgentAudio -> 8 kHz G.711 at real-time pace;
  Interrupted -> queued agent audio dropped; PlaybackPosition reported as it plays.
  The stream ends OK (the agent's end_call, after its goodbye) -> the queued audio plays out,
  then BYE. The caller's BYE (or CANCEL) -> the stream is cancelled. No ACK within 32 s, no
  RTP for sip_rtp_timeout_seconds, or the drain deadline -> BYE.

DTMF (RFC 4733 events, or SIP INFO application/dtmf-relay) is logged as an event and sent to
the edge as a Converse `Dtmf`: the edge makes the keys one keypad turn (ended by "#" or a
pause) that the LLM reads as "[keypad: 4 2 #]"; "1" answers the recording consent question.

Every call's milestones are logged as `EVENT {json}` lines (call, kind, ...): what tests and
operators grep for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import socket
import time
from dataclasses import dataclass

import grpc
from aiortp import PortAllocator
from sipmessage import URI, CSeq, Message, Request, Response, Via

from voicestack import telemetry
from voicestack.client import edge_channel, edge_metadata
from voicestack.config import Settings, edge_api_key, public_view
from voicestack.sip.digest import DigestAuth
from voicestack.sip.media import FRAME_BYTES, PHONE_RATE, CallMedia
from voicestack.sip.sdp import (
    Offer,
    SdpError,
    build_answer,
    new_session_id,
    parse_offer,
)
from voicestack.v1 import audio_pb2, edge_pb2, edge_pb2_grpc

log = logging.getLogger("voicestack.sip")

ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO"
SERVER = "voicestack-sip"
T1, T2 = 0.5, 4.0  # RFC 3261 timers (s)
TRANSACTION_SECONDS = 64 * T1  # Timer B/F/H/J: 32 s
MAX_MESSAGE_BYTES = 65535
KNOWN_METHODS = {"REGISTER", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER", "UPDATE", "PRACK"}
PHRASES = {
    100: "Trying", 180: "Ringing", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    405: "Method Not Allowed", 415: "Unsupported Media Type", 420: "Bad Extension",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 500: "Server Internal Error", 501: "Not Implemented", 503: "Service Unavailable",
    504: "Server Time-out", 600: "Busy Everywhere",
}
# How an edge that refuses the session is told to the caller.
EDGE_REFUSALS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNAUTHENTICATED: 403, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


# -- settings (config.Settings' sip_* fields), checked at start ----------------------------------

def transports(settings: Settings) -> list[str]:
    names = [t.strip().lower() for t in settings.sip_transports.split(",") if t.strip()]
    if not names or any(t not in ("udp", "tcp") for t in names):
        raise SystemExit(f"config: sip_transports={settings.sip_transports!r}: use udp, tcp or udp,tcp")
    return names


def rtp_port_range(settings: Settings) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in settings.sip_rtp_ports.split("-"))
    except ValueError:
        raise SystemExit(f"config: sip_rtp_ports={settings.sip_rtp_ports!r}: use LOW-HIGH, e.g. 10000-10100") from None
    if not 1024 <= low < high <= 65535 or high - low < 2:
        raise SystemExit(f"config: sip_rtp_ports={settings.sip_rtp_ports!r}: LOW-HIGH within 1024-65535, "
                         "at least one even/odd pair")
    return low, high


def auth_enabled(settings: Settings) -> bool:
    return bool(settings.sip_username and settings.sip_password)


def check_settings(settings: Settings) -> Settings:
    """The sip_* settings that cannot work, refused at start (SystemExit, like config.py)."""
    transports(settings)
    rtp_port_range(settings)
    if settings.sip_busy_code not in (486, 503, 600):
        raise SystemExit(f"config: sip_busy_code={settings.sip_busy_code}: use 486, 503 or 600")
    if settings.sip_capacity < 1:
        raise SystemExit("config: sip_capacity must be at least 1")
    if bool(settings.sip_username) != bool(settings.sip_password):
        raise SystemExit("config: set both sip_username and sip_password (or neither)")
    if bool(settings.sip_edge_cert_file) != bool(settings.sip_edge_key_file):
        raise SystemExit("config: set both sip_edge_cert_file and sip_edge_key_file (or neither)")
    return settings


class BadRequest(ValueError):
    """A request we can answer, but only with 400 (and this reason)."""


@dataclass
class Source:
    """Where a message came from, and so where its responses go."""

    transport: str  # "udp" or "tcp"
    addr: tuple[str, int]
    writer: asyncio.StreamWriter | None = None

    @property
    def via_transport(self) -> str:
        return self.transport.upper()


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(10)


def parse_request(data: bytes) -> Request | Response:
    """sipmessage's parse, plus the checks RFC 3261 asks of every request (mandatory
    headers, CSeq matching the method, Content-Length). ValueError: not SIP at all (dropped);
    BadRequest: answerable with 400."""
    data = data.lstrip(b"\r\n")
    if b"\r\n\r\n" not in data:
        data = data + b"\r\n\r\n" if data.endswith(b"\r\n") else data
    message = Message.parse(data)
    if isinstance(message, Response):
        return message
    if not message.headers.getlist("Via") or not message.via:
        raise ValueError("no Via header: no way to answer")
    top = message.via[0]
    if not top.parameters.get("branch"):
        raise ValueError("the top Via has no branch")
    for name in ("From", "To", "Call-ID", "CSeq"):
        if not message.headers.get(name):
            raise BadRequest(f"missing {name} header")
    try:
        cseq = message.cseq
        message.from_address, message.to_address  # noqa: B018 - parsed to check them
    except ValueError as error:
        raise BadRequest(f"malformed header: {error}") from None
    if cseq.method != message.method and message.method not in ("ACK", "CANCEL"):
        raise BadRequest(f"CSeq method {cseq.method} does not match {message.method}")
    length = message.headers.get("Content-Length")
    if length is not None:
        try:
            expected = int(length)
        except ValueError:
            raise BadRequest("malformed Content-Length") from None
        if expected > len(message.body) or expected < 0:
            raise BadRequest("body shorter than Content-Length")
        message.body = message.body[:expected]
    return message


class Call:
    """One phone call: its SIP dialog, its RTP session and its Converse stream."""

    def __init__(self, gateway: SipGateway, invite: Request, source: Source, offer: Offer):
        self.gateway = gateway
        self.invite = invite
        self.source = source
        self.offer = offer
        self.call_id = invite.call_id
        self.branch = invite.via[0].parameters["branch"]
        self.invite_cseq = invite.cseq.sequence
        self.local_tag = new_tag()
        self.remote_tag = invite.from_address.parameters.get("tag") or ""
        self.remote_target = invite.contact[0].uri if invite.contact else invite.from_address.uri
        self.route_set = list(invite.record_route)  # UAS: in order
        self.local_cseq = secrets.randbelow(10000) + 1
        self.local_host = gateway.local_host_for(source.addr[0])
        self.sdp_session_id = new_session_id()
        self.sdp_version = 1
        self.media: CallMedia | None = None
        self.state = "proceeding"  # -> answered (200 sent) -> confirmed (ACK) -> terminated
        self.started = asyncio.Event()  # SessionStarted arrived
        self.ended = asyncio.Event()  # the call is over, everything closed
        self.acked = asyncio.Event()
        self.uplink: asyncio.Queue = asyncio.Queue(maxsize=500)  # ConverseRequests (10 s of audio)
        self.grpc_call = None
        self.converse_task: asyncio.Task | None = None
        self.task: asyncio.Task | None = None
        self.session_id = ""
        self.output_rate = 24000
        self.edge_status: tuple[grpc.StatusCode, str] | None = None
        self.interrupted_turns: set[int] = set()
        self.current_turn = 0
        self.reported: dict[int, int] = {}
        self.hangup_reason = ""
        self.created = time.monotonic()

    # -- helpers ------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> None:
        self.gateway.event(self, kind, **fields)

    def response(self, code: int, **kwargs) -> Response:
        return self.gateway.build_response(self.invite, code, to_tag=self.local_tag, **kwargs)

    @property
    def local_uri(self) -> str:
        return f"{self.invite.headers['To']};tag={self.local_tag}" if ";tag=" not in self.invite.headers["To"] \
            else self.invite.headers["To"]

    def session_config(self) -> edge_pb2.SessionConfig:
        s = self.gateway.settings
        config = edge_pb2.SessionConfig(
            input_format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=PHONE_RATE,
                                               channels=1),
            system_prompt=s.sip_system_prompt, greeting=s.sip_greeting, voice=s.sip_voice)
        config.tools.end_call = s.sip_end_call
        return config

    # -- the call's life ----------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._answer()
            if self.state in ("answered", "confirmed"):
                await self.ended.wait()
        except Exception:
            log.exception("call %s failed", self.call_id)
            await self.terminate("gateway error", send_bye=self.state in ("answered", "confirmed"))
        finally:
            if not self.ended.is_set():
                await self.terminate("ended")

    async def _answer(self) -> None:
        gateway = self.gateway
        try:
            self.media = await CallMedia.open(gateway.allocator, self.local_host, self.offer,
                                              self._caller_audio, self._dtmf)
        except (RuntimeError, OSError) as error:
            log.warning("call %s: no RTP port (%s)", self.call_id, error)
            await self.refuse(503, headers={"Retry-After": "5"}, reason="no RTP port")
            return
        self.converse_task = asyncio.create_task(self._converse())
        waiters = [asyncio.ensure_future(self.started.wait()), self.converse_task]
        await asyncio.wait(waiters, timeout=gateway.settings.sip_answer_timeout_seconds,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiters[0].cancel()
        if self.state != "proceeding":  # CANCELled meanwhile: already answered 487
            return
        if not self.started.is_set():
            code, reason = 504, "the edge did not start the session in time"
            if self.edge_status is not None:
                code = EDGE_REFUSALS.get(self.edge_status[0], 500)
                reason = f"edge: {self.edge_status[0].name} {self.edge_status[1]}"[:200]
            headers = {"Retry-After": "5"} if code == 503 else {}
            await self.refuse(503 if code == 504 else code, headers=headers, reason=reason)
            return
        answer = build_answer(self.offer, self.local_host, self.media.local_port, self.sdp_session_id, self.sdp_version)
        response = self.response(200, body=answer, content_type="application/sdp",
                                 headers={"Contact": gateway.contact(self.source, self.local_host),
                                          "Allow": ALLOW, "Supported": ""})
        self.state = "answered"
        self.media.start()
        gateway.send_response(self.invite, response, self.source)
        self.event("answered", codec=self.offer.codec, rtp_port=self.media.local_port,
                   remote=f"{self.offer.remote_host}:{self.offer.remote_port}", session_id=self.session_id,
                   dtmf_payload_type=self.offer.dtmf_payload_type)
        asyncio.create_task(self._retransmit_200(bytes(response)))
        asyncio.create_task(self._watch_rtp())

    async def _retransmit_200(self, data: bytes) -> None:
        """RFC 3261 13.3.1.4: the 200 goes again at T1, 2T1... (at most T2) until the ACK; none
        in 64*T1 ends the call."""
        interval, deadline = T1, time.monotonic() + TRANSACTION_SECONDS
        while not self.acked.is_set() and not self.ended.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.acked.wait(), interval)
            if self.acked.is_set() or self.ended.is_set():
                return
            if time.monotonic() > deadline:
                await self.terminate("no ACK for the 200 OK", send_bye=True)
                return
            if self.source.transport == "udp":
                self.gateway.send(data, self.source)
            interval = min(interval * 2, T2)

    async def _watch_rtp(self) -> None:
        timeout = self.gateway.settings.sip_rtp_timeout_seconds
        if timeout <= 0:
            return
        while not self.ended.is_set():
            await asyncio.sleep(min(1.0, timeout / 4))
            if self.media and time.monotonic() - self.media.last_rtp_in > timeout:
                await self.terminate(f"no RTP from the caller for {timeout:.0f}s", send_bye=True)
                return

    async def refuse(self, code: int, headers: dict | None = None, reason: str = "") -> None:
        """A final non-2xx answer to the INVITE, then everything closes."""
        if self.state != "proceeding":
            return
        self.state = "terminated"
        if reason:
            headers = {**(headers or {}), "Warning": f'399 {SERVER} "{reason}"'}
        self.gateway.send_final_error(self.invite, self.response(code, headers=headers or {}), self.source)
        self.event("refused", code=code, reason=reason)
        await self.terminate(reason or PHRASES.get(code, ""))

    async def cancel(self) -> None:
        """CANCEL before the answer: 487 for the INVITE."""
        if self.state == "proceeding":
            await self.refuse(487, reason="cancelled by the caller")

    # -- audio and events -----------------------------------------------------------------
    def _caller_audio(self, pcm: bytes) -> None:
        if self.state == "terminated":
            return
        try:
            self.uplink.put_nowait(edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=pcm)))
        except asyncio.QueueFull:  # the edge stopped reading: it will end the call itself
            pass

    def _dtmf(self, digit: str, duration: int) -> None:
        self.event("dtmf", digit=digit, duration_ms=duration * 1000 // PHONE_RATE)
        with contextlib.suppress(asyncio.QueueFull):  # (the edge stopped reading: it ends the call itself)
            self.uplink.put_nowait(edge_pb2.ConverseRequest(dtmf=edge_pb2.Dtmf(digits=digit)))

    def dtmf_info(self, body: bytes) -> None:
        """SIP INFO application/dtmf-relay: Signal=5, Duration=160."""
        fields = dict(line.split("=", 1) for line in body.decode(errors="replace").splitlines() if "=" in line)
        signal_ = fields.get("Signal", "").strip()
        if signal_:
            self._dtmf(signal_[:1].upper(), int(fields.get("Duration", "0").strip() or 0) * PHONE_RATE // 1000)

    async def _requests(self):
        yield edge_pb2.ConverseRequest(config=self.session_config())
        silence = edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=bytes(FRAME_BYTES * 5)))  # 100 ms
        while True:
            try:
                request = await asyncio.wait_for(self.uplink.get(), 0.1)
            except TimeoutError:
                request = silence  # the phone sent nothing (not answered yet, hold, lost RTP)
            if request is None:
                return
            yield request
            if self.media is not None:  # how much of the agent's turn the phone has heard
                turn = self.current_turn
                played = self.media.played_ms.get(turn, 0)
                if played and played - self.reported.get(turn, 0) >= 200:
                    self.reported[turn] = played
                    yield edge_pb2.ConverseRequest(playback=edge_pb2.PlaybackPosition(turn_index=turn, played_ms=played))

    async def _converse(self) -> None:
        stub = self.gateway.edge_stub()
        self.grpc_call = stub.Converse(self._requests(), metadata=self.gateway.edge_metadata())
        try:
            async for event in self.grpc_call:
                self._on_event(event)
            self.edge_status = (grpc.StatusCode.OK, "")
        except grpc.aio.AioRpcError as error:
            self.edge_status = (error.code(), error.details() or "")
        if self.state in ("answered", "confirmed"):
            code, details = self.edge_status
            self.event("edge_ended", status=code.name, details=details)
            # The agent hung up (end_call: OK after its goodbye) or the edge failed the call:
            # let what is queued play out, then BYE.
            await self._play_out(15.0)
            await self.terminate("the agent ended the call" if code == grpc.StatusCode.OK
                                 else f"edge: {code.name} {details}", send_bye=True)

    async def _play_out(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while self.media and self.media.queued_ms and time.monotonic() < deadline and not self.ended.is_set():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the last packets reach the phone's jitter buffer

    def _on_event(self, event: edge_pb2.ConverseResponse) -> None:
        kind = event.WhichOneof("kind")
        body = getattr(event, kind)
        if kind == "session_started":
            self.session_id, self.output_rate = body.session_id, body.output_sample_rate_hz or 24000
            self.started.set()
        elif kind == "agent_audio":
            if body.turn_index not in self.interrupted_turns and self.media is not None:
                self.current_turn = body.turn_index
                self.media.play(body.turn_index, body.audio.pcm, body.audio.sample_rate_hz or self.output_rate)
        elif kind == "agent_turn_ended":
            if self.media is not None:
                self.media.finish_turn()
            self.event("agent_turn_ended", turn=body.turn_index, text=body.text)
        elif kind == "interrupted":
            self.interrupted_turns.add(body.turn_index)
            dropped = self.media.flush() if self.media is not None else 0
            self.event("interrupted", turn=body.turn_index, played_ms=body.played_ms, dropped_ms=dropped,
                       heard_text=body.heard_text)
        elif kind == "transcript" and body.is_final:
            self.event("transcript", turn=body.turn_index, text=body.text)
        elif kind == "speech_started":
            self.event("speech_started", turn=body.turn_index)
        elif kind == "turn_metrics":
            self.event("turn_metrics", turn=body.turn_index, voice_to_voice_ms=round(body.voice_to_voice_ms, 1),
                       endpointing_ms=round(body.endpointing_ms, 1), stt_final_ms=round(body.stt_final_ms, 1),
                       llm_first_token_ms=round(body.llm_first_token_ms, 1),
                       tts_first_audio_ms=round(body.tts_first_audio_ms, 1))
        elif kind == "error":
            self.event("edge_error", code=body.code, message=body.message, stage=body.stage)
        elif kind == "go_away":
            # Phone calls keep their conversation: the call goes on until the edge ends it.
            self.event("go_away", reason=body.reason, deadline_ms=body.deadline_ms)
        elif kind == "tool_call":
            result = edge_pb2.ToolResult(call_id=body.id, error=f"the phone gateway has no tool {body.name!r}")
            with contextlib.suppress(asyncio.QueueFull):
                self.uplink.put_nowait(edge_pb2.ConverseRequest(tool_result=result))

    # -- the end ----------------------------------------------------------------------------
    async def terminate(self, reason: str, send_bye: bool = False) -> None:
        """End the call once: BYE if asked (and answered), stream cancelled, RTP closed."""
        if self.ended.is_set() or self.hangup_reason:
            await self.ended.wait()
            return
        self.hangup_reason = reason
        if self.edge_status is None and self.grpc_call is not None:
            self.edge_status = (grpc.StatusCode.CANCELLED, "the call ended first")
        answered = self.state in ("answered", "confirmed")
        self.state = "terminated"
        try:
            if send_bye and answered:
                await self.gateway.send_bye(self)
            if self.grpc_call is not None:
                self.grpc_call.cancel()
            with contextlib.suppress(asyncio.QueueFull):
                self.uplink.put_nowait(None)
            current = asyncio.current_task()
            if self.converse_task is not None and self.converse_task is not current:
                self.converse_task.cancel()
                with contextlib.suppress(BaseException):
                    await self.converse_task
            if self.media is not None:
                stats = self.media.session.stats
                self.event("media", frames_sent=self.media.frames_sent, speech_frames_sent=self.media.speech_frames_sent,
                           packets_in=self.media.packets_in, packets_lost=stats.get("packets_lost", 0))
                await self.media.close()
        finally:
            self.gateway.forget(self)
            self.event("ended", reason=reason, seconds=round(time.monotonic() - self.created, 2),
                       edge_status=self.edge_status[0].name if self.edge_status else "")
            self.ended.set()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, gateway: SipGateway):
        self.gateway = gateway

    def datagram_received(self, data: bytes, addr) -> None:
        self.gateway.on_message(data, Source("udp", addr[:2]))

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


class SipGateway:
    def __init__(self, settings: Settings, api_key: str = ""):
        self.settings = settings
        self.api_key = api_key  # for the edge (authorization: Bearer); never logged
        self.calls: dict[str, Call] = {}  # Call-ID -> call
        self.invites: dict[str, Call] = {}  # INVITE branch -> call (CANCEL, retransmissions)
        self.responses: dict[tuple[str, str], tuple[bytes, float]] = {}  # (branch, method) -> last response
        self.error_retransmits: dict[str, asyncio.Task] = {}  # INVITE branch -> non-2xx retransmission
        self.client_transactions: dict[str, asyncio.Future] = {}  # our requests' branches
        self.draining = False
        self.allocator = PortAllocator(rtp_port_range(settings))
        self.auth = DigestAuth(settings.sip_username, settings.sip_password, settings.sip_realm) \
            if auth_enabled(settings) else None
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.base_events.Server | None = None
        self.ports: dict[str, int] = {}
        self.events: list[dict] = []  # every EVENT, for in-process tests
        self._channel: grpc.aio.Channel | None = None
        self._stub = None
        self._tasks: set[asyncio.Task] = set()
        self.calls_total = 0
        self.meters: telemetry.Meters | None = None  # `serve sip` sets it: refusals count as opens refused

    # -- life ---------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        names = transports(s)
        if "udp" in names:
            self.udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(s.sip_host, s.sip_port))
            self.ports["udp"] = self.udp.get_extra_info("sockname")[1]
        if "tcp" in names:
            port = self.ports.get("udp", s.sip_port)
            self.tcp = await asyncio.start_server(self._tcp_client, s.sip_host, port, limit=MAX_MESSAGE_BYTES)
            self.ports["tcp"] = self.tcp.sockets[0].getsockname()[1]
        self._tasks.add(asyncio.create_task(self._sweep()))
        log.info("SIP gateway listening on %s (%s), edge %s, RTP %s, capacity %d%s",
                 s.sip_host, ", ".join(f"{t}/{p}" for t, p in self.ports.items()), s.sip_edge_address,
                 s.sip_rtp_ports, s.sip_capacity, ", digest auth" if self.auth else "")

    async def drain(self, deadline_seconds: float) -> None:
        """Refuse new calls (503), let open ones finish for up to deadline_seconds, then BYE them."""
        self.draining = True
        log.info("draining: %d calls open, up to %.0fs", len(self.calls), deadline_seconds)
        end = time.monotonic() + deadline_seconds
        while self.calls and time.monotonic() < end:
            await asyncio.sleep(0.2)
        await asyncio.gather(*(c.terminate("the gateway is shutting down", send_bye=True)
                               for c in list(self.calls.values())), return_exceptions=True)

    async def close(self) -> None:
        for call in list(self.calls.values()):
            await call.terminate("closed")
        for task in [*self._tasks, *self.error_retransmits.values()]:
            task.cancel()
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.tcp.wait_closed(), 2)
        if self._channel is not None:
            await self._channel.close()

    def edge_stub(self):
        if self._stub is None:
            s = self.settings
            self._channel = edge_channel(s.sip_edge_address, s.sip_edge_ca_file, s.sip_edge_cert_file,
                                         s.sip_edge_key_file)
            self._stub = edge_pb2_grpc.EdgeServiceStub(self._channel)
        return self._stub

    def edge_metadata(self):
        return edge_metadata(self.api_key)

    def event(self, call: Call | None, kind: str, **fields) -> None:
        record = {"call": call.call_id if call else "", "kind": kind, **fields}
        self.events.append(record)
        if len(self.events) > 10000:
            del self.events[:5000]
        log.info("EVENT %s", json.dumps(record))

    def forget(self, call: Call) -> None:
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]
        self.invites.pop(call.branch, None)

    async def _sweep(self) -> None:
        """Forget cached responses after the transaction's lifetime."""
        while True:
            await asyncio.sleep(5)
            cutoff = time.monotonic() - TRANSACTION_SECONDS
            for key in [k for k, (_, at) in self.responses.items() if at < cutoff]:
                del self.responses[key]

    # -- transport ---------------------------------------------------------------------------
    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = Source("tcp", writer.get_extra_info("peername")[:2], writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    log.warning("SIP/TCP from %s: header over %d bytes; closing", source.addr, MAX_MESSAGE_BYTES)
                    return
                if not head.strip():  # RFC 5626 keepalive ping: pong
                    writer.write(b"\r\n")
                    continue
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() in (b"content-length", b"l"):
                        try:
                            length = int(value.strip())
                        except ValueError:
                            length = -1
                if not 0 <= length <= MAX_MESSAGE_BYTES:
                    log.warning("SIP/TCP from %s: bad Content-Length; closing", source.addr)
                    return
                body = await reader.readexactly(length) if length else b""
                self.on_message(head + body, source)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    def send(self, data: bytes, source: Source) -> None:
        if source.transport == "tcp":
            if source.writer is not None and not source.writer.is_closing():
                source.writer.write(data)
        elif self.udp is not None and not self.udp.is_closing():
            self.udp.sendto(data, source.addr)

    def local_host_for(self, remote_ip: str) -> str:
        s = self.settings
        if s.sip_public_host:
            return s.sip_public_host
        if s.sip_host not in ("0.0.0.0", ""):
            return s.sip_host
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # the route's source address
            try:
                probe.connect((remote_ip, 9))
                return probe.getsockname()[0]
            except OSError:
                return "127.0.0.1"

    def contact(self, source: Source, host: str) -> str:
        port = self.ports.get(source.transport, self.settings.sip_port)
        suffix = ";transport=tcp" if source.transport == "tcp" else ""
        return f"<sip:agent@{host}:{port}{suffix}>"

    # -- responses -------------------------------------------------------------------------
    def build_response(self, request: Request, code: int, *, to_tag: str | None = None, reason: str = "",
                       headers: dict | None = None, body: bytes = b"", content_type: str = "") -> Response:
        response = Response(code, reason or PHRASES.get(code, "Unknown"))
        vias = request.via  # send_response fills received/rport on the top one
        response.via = vias
        response.headers.set("From", request.headers["From"])
        to = request.headers["To"]
        if to_tag and code > 100 and ";tag=" not in to.replace(" ", ""):
            to = f"{to};tag={to_tag}"
        response.headers.set("To", to)
        response.headers.set("Call-ID", request.headers["Call-ID"])
        response.headers.set("CSeq", request.headers["CSeq"])
        response.headers.set("Server", SERVER)
        for name, value in (headers or {}).items():
            if value != "":
                response.headers.set(name, value)
        if body:
            response.headers.set("Content-Type", content_type or "application/sdp")
        response.headers.set("Content-Length", str(len(body)))
        response.body = body
        return response

    def _remember_source(self, request: Request, response: Response, source: Source) -> Response:
        """RFC 3261 18.2.1 / RFC 3581: the top Via says where the request really came from."""
        vias = request.via
        if vias:
            top = vias[0]
            params = top.parameters.replace(received=source.addr[0])
            if "rport" in top.parameters:
                params = params.replace(rport=str(source.addr[1]))
            response.via = [Via(transport=top.transport, host=top.host, port=top.port, parameters=params), *vias[1:]]
        return response

    def send_response(self, request: Request, response: Response, source: Source) -> None:
        response = self._remember_source(request, response, source)
        data = bytes(response)
        branch = request.via[0].parameters.get("branch", "")
        method = request.cseq.method if request.method != "CANCEL" else "CANCEL"
        self.responses[(branch, method)] = (data, time.monotonic())
        self.send(data, source)
        log.debug("-> %s %d %s %s", source.addr, response.code, method, request.call_id)

    def respond(self, request: Request, code: int, source: Source, **kwargs) -> None:
        kwargs.setdefault("to_tag", new_tag())
        self.send_response(request, self.build_response(request, code, **kwargs), source)

    def send_final_error(self, invite: Request, response: Response, source: Source) -> None:
        """A non-2xx final answer to an INVITE: on UDP, again at T1, 2T1... until its ACK."""
        self.send_response(invite, response, source)
        if source.transport != "udp":
            return
        branch = invite.via[0].parameters["branch"]
        data = self.responses[(branch, "INVITE")][0]

        async def again():
            interval, deadline = T1, time.monotonic() + TRANSACTION_SECONDS
            while time.monotonic() < deadline:
                await asyncio.sleep(interval)
                self.send(data, source)
                interval = min(interval * 2, T2)

        old = self.error_retransmits.pop(branch, None)
        if old:
            old.cancel()
        task = asyncio.create_task(again())
        self.error_retransmits[branch] = task
        task.add_done_callback(lambda _: self.error_retransmits.pop(branch, None)
                               if self.error_retransmits.get(branch) is task else None)

    # -- requests ----------------------------------------------------------------------------
    def on_message(self, data: bytes, source: Source) -> None:
        if not data.strip():
            return  # keepalive
        try:
            message = parse_request(data)
        except BadRequest as error:
            self._bad_request(data, source, str(error))
            return
        except (ValueError, KeyError) as error:
            log.info("dropped an unparsable SIP message from %s: %s", source.addr, error)
            return
        if isinstance(message, Response):
            self._on_response(message)
            return
        branch = message.via[0].parameters["branch"]
        method = message.method
        if method != "ACK":
            cached = self.responses.get((branch, message.cseq.method if method != "CANCEL" else "CANCEL"))
            if cached is not None:  # a retransmission: the same answer again
                self.send(cached[0], source)
                return
        log.debug("<- %s %s %s", source.addr, method, message.call_id)
        handler = getattr(self, f"_on_{method.lower()}", None)
        if handler is None:
            code = 405 if method in KNOWN_METHODS else 501
            self.respond(message, code, source, headers={"Allow": ALLOW})
            return
        if method not in ("ACK", "CANCEL"):
            unsupported = [t for t in message.require if t not in ("timer",)]
            if unsupported:
                self.respond(message, 420, source, headers={"Unsupported": ", ".join(unsupported)})
                return
            max_forwards = message.headers.get("Max-Forwards")
            if max_forwards is not None and max_forwards.strip().isdigit() and int(max_forwards) <= 0 \
                    and method != "OPTIONS":
                self.respond(message, 483, source)
                return
        handler(message, source)

    def _bad_request(self, data: bytes, source: Source, reason: str) -> None:
        """400 for a request whose Via we can read; otherwise it is dropped."""
        try:
            message = Message.parse(data.lstrip(b"\r\n"))
        except (ValueError, KeyError):
            return
        if isinstance(message, Response) or message.method == "ACK":
            return
        try:
            vias = message.via
        except ValueError:
            return
        if not vias:
            return
        response = Response(400, f"Bad Request ({reason})"[:120])
        response.via = vias
        for name in ("From", "To", "Call-ID", "CSeq"):
            if message.headers.get(name):
                response.headers.set(name, message.headers[name])
        response.headers.set("Server", SERVER)
        response.headers.set("Content-Length", "0")
        self.send(bytes(self._remember_source(message, response, source)), source)
        self.event(None, "bad_request", reason=reason, method=message.method, source=f"{source.addr[0]}:{source.addr[1]}")

    def _on_options(self, request: Request, source: Source) -> None:
        code = 503 if self.draining else 200
        self.respond(request, code, source, headers={"Allow": ALLOW, "Accept": "application/sdp",
                                                     "Retry-After": "10" if self.draining else ""})

    def _on_invite(self, request: Request, source: Source) -> None:
        to_tag = request.to_address.parameters.get("tag")
        if to_tag:  # re-INVITE within a dialog
            self._on_reinvite(request, source)
            return
        if request.call_id in self.calls:  # a new transaction for a call we have: a loop or a fork
            self.respond(request, 482, source)
            return
        if self.draining:
            self.respond(request, 503, source, headers={"Retry-After": "30"}, reason="Service Unavailable (draining)")
            self.event(None, "refused", code=503, reason="draining")
            self._count_refused()
            return
        if self.auth is not None:
            state = self.auth.check("INVITE", request.headers.get("Authorization"))
            if state != "ok":
                response = self.build_response(request, 401, to_tag=new_tag(),
                                               headers={"WWW-Authenticate": self.auth.challenge(stale=state == "stale")})
                self.send_final_error(request, response, source)
                if state == "bad":
                    self.event(None, "auth_failed", source=f"{source.addr[0]}:{source.addr[1]}")
                return
        if len(self.calls) >= self.settings.sip_capacity:
            code = self.settings.sip_busy_code
            headers = {"Retry-After": "10"} if code == 503 else {}
            self.send_final_error(request, self.build_response(request, code, to_tag=new_tag(), headers=headers), source)
            self.event(None, "refused", code=code, reason="at capacity")
            self._count_refused()
            return
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if not request.body:
            self.send_final_error(request, self.build_response(
                request, 488, to_tag=new_tag(),
                headers={"Warning": f'399 {SERVER} "an INVITE without an SDP offer is not supported"'}), source)
            return
        if content_type != "application/sdp":
            self.send_final_error(request, self.build_response(request, 415, to_tag=new_tag(),
                                                               headers={"Accept": "application/sdp"}), source)
            return
        try:
            offer = parse_offer(request.body)
        except SdpError as error:
            response = self.build_response(request, error.status, to_tag=new_tag(),
                                           headers={"Warning": f'399 {SERVER} "{error}"'})
            self.send_final_error(request, response, source)
            self.event(None, "refused", code=error.status, reason=str(error))
            return
        call = Call(self, request, source, offer)
        self.calls[call.call_id] = call
        self.invites[call.branch] = call
        self.calls_total += 1
        self.send_response(request, self.build_response(request, 100), source)
        self.event(call, "invite", caller=str(request.from_address.uri), to=str(request.uri),
                   transport=source.transport, codec=offer.codec)
        call.task = asyncio.create_task(call.run())
        self._tasks.add(call.task)
        call.task.add_done_callback(self._tasks.discard)

    def _count_refused(self) -> None:
        """voicestack_stream_opens_refused_total{stage="sip"}: at capacity or draining."""
        if self.meters is not None:
            self.meters.opens_refused.add(1, {"stage": "sip"})

    def _on_reinvite(self, request: Request, source: Source) -> None:
        call = self.calls.get(request.call_id)
        if call is None or call.state == "terminated":
            self.respond(request, 481, source)
            return
        try:
            offer = parse_offer(request.body) if request.body else call.offer
        except SdpError as error:
            self.respond(request, error.status, source, to_tag=call.local_tag)
            return
        if offer.payload_type != call.offer.payload_type:
            self.respond(request, 488, source, to_tag=call.local_tag)
            return
        call.offer = offer
        call.media.session.update_remote((offer.remote_host, offer.remote_port))
        call.sdp_version += 1
        answer = build_answer(offer, call.local_host, call.media.local_port, call.sdp_session_id, call.sdp_version)
        self.send_response(request, self.build_response(
            request, 200, to_tag=call.local_tag, body=answer,
            headers={"Contact": self.contact(source, call.local_host), "Allow": ALLOW}), source)

    def _on_ack(self, request: Request, source: Source) -> None:
        branch = request.via[0].parameters["branch"]
        task = self.error_retransmits.pop(branch, None)
        if task is not None:  # the ACK of a non-2xx final response
            task.cancel()
            return
        call = self.calls.get(request.call_id)
        if call is not None and request.cseq.sequence == call.invite_cseq and not call.acked.is_set():
            call.acked.set()
            if call.state == "answered":
                call.state = "confirmed"
            call.event("confirmed")

    def _on_cancel(self, request: Request, source: Source) -> None:
        branch = request.via[0].parameters["branch"]
        call = self.invites.get(branch)
        if call is None or call.call_id != request.call_id:
            self.respond(request, 481, source)
            return
        self.respond(request, 200, source, to_tag=call.local_tag)
        call.event("cancel")
        asyncio.create_task(call.cancel())

    def _on_bye(self, request: Request, source: Source) -> None:
        call = self.calls.get(request.call_id)
        from_tag = request.from_address.parameters.get("tag") or ""
        if call is None or (call.remote_tag and from_tag != call.remote_tag):
            self.respond(request, 481, source)
            return
        self.respond(request, 200, source, to_tag=call.local_tag)
        call.event("bye_received")
        if call.state == "proceeding":  # BYE before our 200: as a CANCEL (RFC 3261 15.1.2)
            asyncio.create_task(call.refuse(487, reason="the caller hung up"))
        else:
            asyncio.create_task(call.terminate("the caller hung up"))

    def _on_info(self, request: Request, source: Source) -> None:
        call = self.calls.get(request.call_id)
        if call is None:
            self.respond(request, 481, source)
            return
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type == "application/dtmf-relay":
            call.dtmf_info(request.body)
        self.respond(request, 200, source, to_tag=call.local_tag)

    # -- our requests (BYE) ---------------------------------------------------------------
    def _on_response(self, response: Response) -> None:
        try:
            branch = response.via[0].parameters.get("branch", "")
        except (ValueError, IndexError):
            return
        future = self.client_transactions.get(branch)
        if future is not None and not future.done() and response.code >= 200:
            future.set_result(response.code)

    async def send_bye(self, call: Call) -> None:
        """BYE within the call's dialog (RFC 3261 15.1.1), retransmitted on UDP until answered."""
        call.local_cseq += 1
        target = call.remote_target
        request = Request("BYE", target)
        branch = new_branch()
        transport = call.source.transport
        port = self.ports.get(transport, self.settings.sip_port)
        request.headers.add("Via", f"SIP/2.0/{transport.upper()} {call.local_host}:{port};branch={branch};rport")
        request.headers.add("Max-Forwards", "70")
        request.headers.add("From", call.local_uri)
        request.headers.add("To", call.invite.headers["From"])
        request.headers.add("Call-ID", call.call_id)
        request.headers.add("CSeq", str(CSeq(call.local_cseq, "BYE")))
        if call.route_set:
            request.headers.add("Route", ", ".join(str(r) for r in call.route_set))
        request.headers.add("User-Agent", SERVER)
        request.headers.add("Content-Length", "0")
        data = bytes(request)
        destination = self._destination(call)
        future = asyncio.get_running_loop().create_future()
        self.client_transactions[branch] = future
        call.event("bye_sent", reason=call.hangup_reason)
        try:
            if transport == "tcp":
                self.send(data, call.source)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(future), TRANSACTION_SECONDS)
                return
            interval, deadline = T1, time.monotonic() + TRANSACTION_SECONDS
            while time.monotonic() < deadline:
                self.send(data, Source("udp", destination))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(future), interval)
                if future.done():
                    call.event("bye_answered", code=future.result())
                    return
                interval = min(interval * 2, T2)
            log.warning("call %s: BYE unanswered", call.call_id)
        finally:
            self.client_transactions.pop(branch, None)

    def _destination(self, call: Call) -> tuple[str, int]:
        uri: URI = call.route_set[0].uri if call.route_set else call.remote_target
        host, port = uri.host, uri.port or 5060
        try:
            socket.inet_aton(host)
        except OSError:
            try:
                host = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
            except OSError:
                return call.source.addr
        return host, port


# -- the process ---------------------------------------------------------------------------------

async def serve(settings: Settings, api_key: str = "") -> None:
    """Run until SIGTERM/SIGINT, then drain: new INVITEs get 503, open calls go on up to
    drain_seconds, then get a BYE. Prometheus metrics on settings.metrics_port, as the stages'
    (calls in flight and capacity: voicestack_streams_active / _capacity{stage="sip"})."""
    gateway = SipGateway(settings, api_key)
    gateway.meters = telemetry.setup("sip", settings.metrics_port, settings.sip_host)
    gateway.meters.observe_streams(lambda: len(gateway.calls), lambda: settings.sip_capacity)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    log.info("ready on sip:agent@%s:%d", settings.sip_host, next(iter(gateway.ports.values())))
    await stop.wait()
    log.info("SIGTERM: new calls get 503, open ones have %.0f s", settings.drain_seconds)
    await gateway.drain(settings.drain_seconds)
    await gateway.close()
    telemetry.shutdown()
    log.info("stopped (%d calls)", gateway.calls_total)


def run(settings: Settings) -> None:
    """`voicestack serve sip`: the process's event loop starts here. The edge's API key comes
    from VOICESTACK_API_KEY only (config.edge_api_key)."""
    check_settings(settings)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s sip %(levelname)s %(name)s: %(message)s")
    view = {k: v for k, v in public_view(settings).items()
            if k.startswith("sip_") or k in ("metrics_port", "drain_seconds", "log_level")}
    log.info("starting with %s", json.dumps(view))  # (secrets masked; the API key is no setting)
    asyncio.run(serve(settings, edge_api_key()))


__all__ = ["Call", "SipGateway", "check_settings", "parse_request", "run", "serve"]
