"""The SIP gateway (services/voicestack/sip): SIP edge cases against the gateway in process
with a fake edge, then real phone calls: Debian's baresip dials the gateway (a real process)
in front of the real stack, and five at once in front of a stack on cheap engines."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import socket
import subprocess
import time
import urllib.request
import wave
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import speak, words
from sipmessage import Message
from voicestack.audio import float_to_pcm16, read_wav, resample, write_wav
from voicestack.config import Settings
from voicestack.launcher import START_ORDER, Stack, free_port
from voicestack.sip.digest import client_authorization
from voicestack.sip.gateway import SipGateway, check_settings
from voicestack.v1 import audio_pb2, edge_pb2, edge_pb2_grpc

SDP_OFFER = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
             "m=audio {port} RTP/AVP {pts}\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
             "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n")
CHEAP_ENV = {"VOICESTACK_CHEAP_ENGINES": "1", "VOICESTACK_CAPACITY": "5000"}  # as load/capacity.py


def rtp_range() -> str:
    """A port range nobody else on this shared machine is likely to use at the same time."""
    base = random.randrange(30000, 59000, 200)
    return f"{base}-{base + 198}"


# -- a fake edge and a raw SIP client, for the in-process tests --------------------------------------

class FakeEdge(edge_pb2_grpc.EdgeServiceServicer):
    """Says 0.5 s of tone as turn 0, then listens; `start_delay` holds SessionStarted back."""

    def __init__(self):
        self.start_delay = 0.0
        self.end_after: float | None = None  # end the stream OK this long after the tone (the agent hangs up)
        self.sessions = 0
        self.ended = 0  # streams over, however they ended
        self.dtmf: list[str] = []  # the digits of every Dtmf the gateway sent

    async def Converse(self, request_iterator, context):
        first = await request_iterator.__anext__()
        assert first.config.input_format.sample_rate_hz == 8000
        self.sessions += 1
        try:
            await asyncio.sleep(self.start_delay)
            yield edge_pb2.ConverseResponse(session_started=edge_pb2.SessionStarted(session_id=f"s{self.sessions}",
                                                                                   output_sample_rate_hz=24000))
            tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(12000) / 24000) * 32767).astype("<i2").tobytes()
            yield edge_pb2.ConverseResponse(agent_audio=edge_pb2.AgentAudio(
                turn_index=0, audio=audio_pb2.AudioChunk(pcm=tone, sample_rate_hz=24000)))
            if self.end_after is not None:
                await asyncio.sleep(self.end_after)
                return
            async for request in request_iterator:
                if request.WhichOneof("kind") == "dtmf":
                    self.dtmf.append(request.dtmf.digits)
        finally:
            self.ended += 1


@pytest.fixture
async def fake_edge():
    server = grpc.aio.server()
    edge = FakeEdge()
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(edge, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    edge.address = f"127.0.0.1:{port}"
    yield edge
    await server.stop(None)


@pytest.fixture
async def gateway_factory(fake_edge):
    made = []

    async def make(**overrides) -> SipGateway:
        settings = check_settings(Settings(sip_port=0, sip_transports="udp", sip_edge_address=fake_edge.address,
                                           sip_rtp_ports=rtp_range(), **overrides))
        gateway = SipGateway(settings)
        await gateway.start()
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        await gateway.close()


class SipClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait(Message.parse(data))

    @classmethod
    async def open(cls, gateway_port: int) -> SipClient:
        transport, client = await asyncio.get_running_loop().create_datagram_endpoint(
            cls, local_addr=("127.0.0.1", 0), remote_addr=("127.0.0.1", gateway_port))
        client.transport, client.port, client.gateway_port = transport, transport.get_extra_info("sockname")[1], gateway_port
        return client

    def send(self, text: str) -> None:
        self.transport.sendto(text.encode())

    async def response(self, timeout: float = 10.0, final: bool = True):
        while True:
            message = await asyncio.wait_for(self.queue.get(), timeout)
            if not final or message.code >= 200:
                return message

    def request(self, method: str, call_id: str, branch: str, cseq: int, *, to_tag: str = "", body: str = "",
                extra: str = "", uri: str | None = None, cseq_method: str | None = None) -> str:
        uri = uri or f"sip:agent@127.0.0.1:{self.gateway_port}"
        lines = [f"{method} {uri} SIP/2.0",
                 f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch};rport",
                 "Max-Forwards: 70",
                 f"From: <sip:caller@127.0.0.1>;tag=caller{call_id}",
                 f"To: <sip:agent@127.0.0.1>{';tag=' + to_tag if to_tag else ''}",
                 f"Call-ID: {call_id}",
                 f"CSeq: {cseq} {cseq_method or method}",
                 f"Contact: <sip:caller@127.0.0.1:{self.port}>"]
        if extra:
            lines.append(extra)
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        return "\r\n".join(lines) + "\r\n\r\n" + body

    def invite(self, call_id: str, branch: str, cseq: int = 1, extra: str = "", pts: str = "0 8 101") -> str:
        return self.request("INVITE", call_id, branch, cseq, body=SDP_OFFER.format(port=40000, pts=pts), extra=extra)

    def close(self):
        self.transport.close()


def to_tag(response) -> str:
    return response.to_address.parameters.get("tag") or ""


# -- settings: config.Settings' sip_* fields ------------------------------------------------------

def test_sip_settings_come_from_the_one_loader():
    from voicestack.config import load_settings, public_view

    environ = {"VOICESTACK_SIP_PORT": "5070", "VOICESTACK_SIP_PASSWORD": "s3cret", "VOICESTACK_SIP_USERNAME": "alice"}
    settings = load_settings("sip", {"sip_capacity": 3}, environ=environ)
    assert (settings.sip_port, settings.sip_capacity) == (5070, 3)
    assert check_settings(settings) is settings
    assert "s3cret" not in repr(settings) and public_view(settings)["sip_password"] == "***"
    for bad, message in [({"sip_rtp_ports": "10000"}, "LOW-HIGH"), ({"sip_rtp_ports": "10000-10001"}, "pair"),
                         ({"sip_transports": "tls"}, "udp, tcp"), ({"sip_busy_code": 404}, "486"),
                         ({"sip_username": "alice"}, "both")]:
        with pytest.raises(SystemExit, match=message):
            check_settings(Settings(**bad))
    # The edge's API key is VOICESTACK_API_KEY only: no setting, so no flag (flags show in ps).
    assert not {"api_key", "sip_edge_api_key"} & set(Settings.__dataclass_fields__)


# -- SIP edge cases, in process -------------------------------------------------------------------

async def test_options_answers_with_allow(gateway_factory):
    gateway = await gateway_factory()
    client = await SipClient.open(gateway.ports["udp"])
    client.send(client.request("OPTIONS", "opt-1", "z9hG4bKopt1", 1))
    response = await client.response()
    assert response.code == 200
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS"} <= allowed
    assert response.headers["Call-ID"] == "opt-1" and response.headers["CSeq"] == "1 OPTIONS"
    assert response.via[0].parameters["received"] == "127.0.0.1"
    assert response.via[0].parameters["rport"] == str(client.port)
    # Methods we do not take: 405 with Allow (known) or 501 (unknown).
    client.send(client.request("REGISTER", "reg-1", "z9hG4bKreg1", 1))
    assert (await client.response()).code == 405
    client.send(client.request("FROBNICATE", "frob-1", "z9hG4bKfrob1", 1))
    assert (await client.response()).code == 501
    client.close()


async def test_bad_requests_get_400_and_garbage_is_dropped(gateway_factory):
    gateway = await gateway_factory()
    client = await SipClient.open(gateway.ports["udp"])
    # No Call-ID.
    text = client.invite("bad-1", "z9hG4bKbad1").replace("Call-ID: bad-1\r\n", "")
    client.send(text)
    response = await client.response()
    assert response.code == 400 and "Call-ID" in response.phrase
    # CSeq method not matching the request's.
    client.send(client.request("INVITE", "bad-2", "z9hG4bKbad2", 1, cseq_method="BYE",
                               body=SDP_OFFER.format(port=40000, pts="0")))
    assert (await client.response()).code == 400
    # Content-Length longer than the body.
    client.send(client.invite("bad-3", "z9hG4bKbad3").replace("Content-Length: ", "Content-Length: 9"))
    assert (await client.response()).code == 400
    # Malformed SDP, and an offer with no codec we speak.
    client.send(client.request("INVITE", "bad-4", "z9hG4bKbad4", 1, body="v=0\r\nthis is not sdp\r\n"))
    response = await client.response()
    assert response.code in (400, 488)
    client.send(client.request("ACK", "bad-4", "z9hG4bKbad4", 1, to_tag=to_tag(response)))  # ends its retransmission
    client.send(client.invite("bad-5", "z9hG4bKbad5", pts="9 96").replace("a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n",
                                                                         "a=rtpmap:9 G722/8000\r\na=rtpmap:96 opus/48000/2\r\n"))
    response = await client.response()
    assert response.code == 488, response.phrase
    client.send("ACK sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKbad5\r\n"
                "Call-ID: bad-5\r\nCSeq: 1 ACK\r\nFrom: <sip:a@b>;tag=x\r\nTo: <sip:c@d>\r\n\r\n")
    # Not SIP at all, and no Via: nothing to answer, nothing breaks.
    client.send("hello there\r\n\r\n")
    client.send("OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nCall-ID: x\r\n\r\n")
    with pytest.raises(asyncio.TimeoutError):
        await client.response(timeout=1.0)
    assert gateway.calls == {}
    client.close()


async def test_call_answers_then_bye_ends_the_stream(gateway_factory, fake_edge):
    gateway = await gateway_factory()
    client = await SipClient.open(gateway.ports["udp"])
    client.send(client.invite("call-1", "z9hG4bKcall1"))
    trying = await client.response(final=False)
    assert trying.code == 100
    ok = await client.response()
    assert ok.code == 200 and ok.headers["Content-Type"] == "application/sdp"
    assert "m=audio" in ok.body.decode() and "PCMU/8000" in ok.body.decode() and "telephone-event" in ok.body.decode()
    tag = to_tag(ok)
    assert tag
    client.send(client.request("ACK", "call-1", "z9hG4bKack1", 1, to_tag=tag))
    await asyncio.sleep(0.5)
    call = gateway.calls["call-1"]
    assert call.state == "confirmed"
    client.send(client.request("BYE", "call-1", "z9hG4bKbye1", 2, to_tag=tag))
    assert (await client.response()).code == 200
    await asyncio.wait_for(call.ended.wait(), 5)
    await asyncio.sleep(0.3)
    assert "call-1" not in gateway.calls
    for _ in range(50):  # the Converse stream ends with the call
        if fake_edge.ended:
            break
        await asyncio.sleep(0.1)
    assert fake_edge.ended == 1
    ended = [e for e in gateway.events if e["kind"] == "ended" and e["call"] == "call-1"]
    assert ended and ended[0]["reason"] == "the caller hung up"
    # A BYE for a call that is gone: 481.
    client.send(client.request("BYE", "call-1", "z9hG4bKbye2", 3, to_tag=tag))
    assert (await client.response()).code == 481
    client.close()


async def test_digest_auth_challenges_then_answers(gateway_factory):
    gateway = await gateway_factory(sip_username="alice", sip_password="s3cret")
    client = await SipClient.open(gateway.ports["udp"])
    client.send(client.invite("auth-1", "z9hG4bKauth1"))
    challenge = await client.response()
    assert challenge.code == 401
    www = challenge.headers["WWW-Authenticate"]
    assert www.startswith("Digest") and 'realm="voicestack"' in www and "nonce=" in www
    client.send(client.request("ACK", "auth-1", "z9hG4bKauth1", 1, to_tag=to_tag(challenge)))
    # A wrong password: challenged again.
    uri = f"sip:agent@127.0.0.1:{gateway.ports['udp']}"
    wrong = client_authorization(www, "INVITE", uri, "alice", "guess")
    client.send(client.invite("auth-1", "z9hG4bKauth2", cseq=2, extra=f"Authorization: {wrong}"))
    assert (await client.response()).code == 401
    right = client_authorization(www, "INVITE", uri, "alice", "s3cret")
    client.send(client.invite("auth-1", "z9hG4bKauth3", cseq=3, extra=f"Authorization: {right}"))
    ok = await client.response()
    assert ok.code == 200, ok.phrase
    client.send(client.request("ACK", "auth-1", "z9hG4bKack3", 3, to_tag=to_tag(ok)))
    client.send(client.request("BYE", "auth-1", "z9hG4bKbye3", 4, to_tag=to_tag(ok)))
    assert (await client.response()).code == 200
    assert any(e["kind"] == "auth_failed" for e in gateway.events)
    client.close()


async def test_cancel_before_the_answer_gets_487(gateway_factory, fake_edge):
    fake_edge.start_delay = 5.0  # the edge is slow to start: the phone is still ringing
    gateway = await gateway_factory()
    client = await SipClient.open(gateway.ports["udp"])
    client.send(client.invite("cancel-1", "z9hG4bKcancel1"))
    assert (await client.response(final=False)).code == 100
    # A retransmitted INVITE gets the provisional again, and starts nothing new.
    client.send(client.invite("cancel-1", "z9hG4bKcancel1"))
    assert (await client.response(final=False)).code == 100
    client.send(client.request("CANCEL", "cancel-1", "z9hG4bKcancel1", 1))
    responses = [await client.response(), await client.response()]
    codes = sorted((r.code, r.cseq.method) for r in responses)
    assert codes == [(200, "CANCEL"), (487, "INVITE")], codes
    client.send(client.request("ACK", "cancel-1", "z9hG4bKcancel1", 1,
                               to_tag=to_tag(next(r for r in responses if r.code == 487))))
    await asyncio.sleep(0.5)
    assert "cancel-1" not in gateway.calls and fake_edge.sessions <= 1 and gateway.calls_total == 1
    # A CANCEL matching nothing: 481.
    client.send(client.request("CANCEL", "nope", "z9hG4bKnope", 1))
    assert (await client.response()).code == 481
    client.close()


async def test_capacity_and_drain_refuse_new_calls(gateway_factory):
    gateway = await gateway_factory(sip_capacity=1)
    client = await SipClient.open(gateway.ports["udp"])
    client.send(client.invite("cap-1", "z9hG4bKcap1"))
    ok = await client.response()
    assert ok.code == 200
    client.send(client.request("ACK", "cap-1", "z9hG4bKcapack", 1, to_tag=to_tag(ok)))
    client.send(client.invite("cap-2", "z9hG4bKcap2"))
    assert (await client.response()).code == 486
    client.send(client.request("ACK", "cap-2", "z9hG4bKcap2", 1))
    # Draining: new INVITEs and OPTIONS probes get 503; the open call goes on until it ends.
    drain = asyncio.create_task(gateway.drain(30))
    await asyncio.sleep(0.1)
    client.send(client.invite("cap-3", "z9hG4bKcap3"))
    busy = await client.response()
    assert busy.code == 503 and busy.headers.get("Retry-After")
    client.send(client.request("OPTIONS", "opt-2", "z9hG4bKopt2", 1))
    assert (await client.response()).code == 503
    assert not drain.done()
    client.send(client.request("BYE", "cap-1", "z9hG4bKcapbye", 2, to_tag=to_tag(ok)))
    assert (await client.response()).code == 200
    await asyncio.wait_for(drain, 5)
    client.close()


async def test_the_edge_ending_the_call_sends_bye(gateway_factory, fake_edge):
    fake_edge.end_after = 0.5
    gateway = await gateway_factory()
    client = await SipClient.open(gateway.ports["udp"])
    client.send(client.invite("end-1", "z9hG4bKend1"))
    ok = await client.response()
    client.send(client.request("ACK", "end-1", "z9hG4bKendack", 1, to_tag=to_tag(ok)))
    call = gateway.calls["end-1"]
    bye = await client.response(final=False)  # after the tone has played out
    assert bye.method == "BYE" and bye.headers["Call-ID"] == "end-1"
    assert bye.to_address.parameters["tag"] == "callerend-1" and bye.from_address.parameters["tag"] == to_tag(ok)
    assert bye.cseq.method == "BYE"
    # Answer it: the gateway stops retransmitting.
    reply = (f"SIP/2.0 200 OK\r\nVia: {bye.headers['Via']}\r\nFrom: {bye.headers['From']}\r\nTo: {bye.headers['To']}\r\n"
             f"Call-ID: end-1\r\nCSeq: {bye.headers['CSeq']}\r\nContent-Length: 0\r\n\r\n")
    client.send(reply)
    await asyncio.wait_for(call.ended.wait(), 5)
    assert any(e["kind"] == "bye_answered" and e["call"] == "end-1" for e in gateway.events)
    client.close()


# -- metrics: `voicestack serve sip` exports its calls as the stages export their streams --------

def scrape(port: int) -> dict[str, float]:
    """The gateway's Prometheus samples with stage="sip", by name."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("stage") == "sip"}


async def wait_metric(port: int, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (found := (await asyncio.to_thread(scrape, port)).get(name)) != value:
        assert time.monotonic() < deadline, f"{name} is {found}, not {value}"
        await asyncio.sleep(0.2)


async def test_metrics_count_calls_for_the_autoscaler(fake_edge, tmp_path):
    """The gateway process serves voicestack_streams_active / _capacity{stage="sip"} (what the chart's
    autoscalers read): 1 during a call, 0 after its BYE; a refused INVITE counts as an open refused."""
    stack = Stack(ports="free", log_dir=tmp_path)
    name = f"sip-metrics-{free_port()}"
    process = stack.spawn_gateway("sip", name, edge_address=fake_edge.address,
                                  args=["--sip-transports", "udp", "--sip-rtp-ports", rtp_range(), "--sip-capacity", "1"])
    client = None
    try:
        await asyncio.to_thread(stack.wait_ready, [name], 60)
        assert process.metrics_port > 0
        await wait_metric(process.metrics_port, "voicestack_streams_capacity", 1)
        await wait_metric(process.metrics_port, "voicestack_streams_active", 0)
        client = await SipClient.open(process.grpc_port)
        client.send(client.invite("metrics-1", "z9hG4bKmet1"))
        ok = await client.response()
        assert ok.code == 200, ok.phrase
        client.send(client.request("ACK", "metrics-1", "z9hG4bKmetack", 1, to_tag=to_tag(ok)))
        await wait_metric(process.metrics_port, "voicestack_streams_active", 1)
        # At capacity: 486, counted.
        client.send(client.invite("metrics-2", "z9hG4bKmet2"))
        assert (await client.response()).code == 486
        client.send(client.request("ACK", "metrics-2", "z9hG4bKmet2", 1))
        await wait_metric(process.metrics_port, "voicestack_stream_opens_refused_total", 1)
        client.send(client.request("BYE", "metrics-1", "z9hG4bKmetbye", 2, to_tag=to_tag(ok)))
        assert (await client.response()).code == 200
        await wait_metric(process.metrics_port, "voicestack_streams_active", 0)
    finally:
        if client is not None:
            client.close()
        assert await asyncio.to_thread(stack.stop, name) == 0, process.log_path.read_text()[-3000:]


# -- real phones: baresip ---------------------------------------------------------------------------

def baresip_binary() -> str:
    path = shutil.which("baresip")
    assert path, "baresip is needed: apt-get install baresip-core (make test installs it)"
    return path


class Phone:
    """One baresip: its own config dir, the caller's voice from a WAV (aufile), what it hears
    recorded (sndfile: dump-*-dec.wav), no sound card (aubridge as the player), commands over
    ctrl_tcp."""

    def __init__(self, root: Path, name: str, voice_wav: Path):
        self.dir = root / name
        self.records = self.dir / "rec"
        self.records.mkdir(parents=True, exist_ok=True)
        self.sip_port, self.ctrl_port = free_port(), free_port()
        base = random.randrange(20000, 29000, 100)
        (self.dir / "config").write_text("\n".join([
            "poll_method epoll", f"sip_listen 127.0.0.1:{self.sip_port}", "call_local_timeout 120",
            "call_max_calls 4", "audio_player aubridge,nil", f"audio_source aufile,{voice_wav}",
            "audio_alert aubridge,nil", "ausrc_srate 8000", "auplay_srate 8000", "ausrc_channels 1",
            "auplay_channels 1", f"rtp_ports {base}-{base + 98}", "module_path /usr/lib/baresip/modules",
            "module g711.so", "module aufile.so", "module aubridge.so", "module sndfile.so",
            "module_tmp account.so", "module_app menu.so", "module_app ctrl_tcp.so",
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}", f"snd_path {self.records}", ""]))
        (self.dir / "accounts").write_text("<sip:caller@127.0.0.1>;regint=0;audio_codecs=pcmu,pcma\n")
        self.log_path = self.dir / "baresip.log"
        self.process: subprocess.Popen | None = None

    def dial(self, uri: str) -> None:
        self.process = subprocess.Popen([baresip_binary(), "-f", str(self.dir), "-e", f"/dial {uri}"],
                                        stdin=subprocess.DEVNULL, stdout=open(self.log_path, "wb"),
                                        stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def command(self, command: str, params: str = "") -> str:
        payload = json.dumps({"command": command, "params": params, "token": "t"}).encode()
        with socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=5) as sock:
            sock.sendall(str(len(payload)).encode() + b":" + payload + b",")
            sock.settimeout(5)
            try:
                return sock.recv(65536).decode(errors="replace")
            except TimeoutError:
                return ""

    def recording(self) -> Path | None:
        found = sorted(self.records.glob("dump-*-dec.wav"))
        return found[-1] if found else None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class GatewayProcess:
    """`voicestack serve sip` in front of a stack's edge, started by the launcher on free ports,
    its log parsed for EVENT lines."""

    def __init__(self, stack: Stack, **settings):
        self.stack, self.name = stack, f"sip-{free_port()}"
        args = {"sip_rtp_ports": rtp_range(), **settings}
        flags = [item for name, value in args.items() for item in ("--" + name.replace("_", "-"), str(value))]
        launched = stack.spawn("sip", name=self.name, args=flags)
        self.process, self.port, self.log_path = launched.popen, launched.grpc_port, launched.log_path
        stack.wait_ready([self.name], timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, kind: str | None = None) -> list[dict]:
        found = [json.loads(line.split("EVENT ", 1)[1]) for line in self.log().splitlines() if " EVENT " in line]
        return [e for e in found if kind is None or e["kind"] == kind]

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate()
            if found:
                return found
            assert self.process.poll() is None, "the gateway died\n" + self.log()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n" + self.log()[-5000:])

    def stop(self) -> int:
        return self.stack.stop(self.name)


def caller_wav(tmp: Path, text: str, lead_s: float, tail_s: float) -> Path:
    """The caller's side: silence while the agent speaks its disclosure, the question, then
    an open line; 8 kHz mono PCM16, as aufile wants for G.711."""
    voice = speak(text, tmp)  # 16 kHz float
    audio = np.concatenate([np.zeros(int(16000 * lead_s), np.float32), voice, np.zeros(int(16000 * tail_s), np.float32)])
    path = tmp / f"caller-{abs(hash((text, lead_s, tail_s)))}.wav"
    write_wav(path, float_to_pcm16(resample(audio, 16000, 8000)), 8000)
    return path


def voiced_seconds(path: Path, threshold: float = 0.02) -> float:
    with wave.open(str(path)) as recording:
        rate = recording.getframerate()
        samples = np.frombuffer(recording.readframes(recording.getnframes()), "<i2").astype(np.float32) / 32768
    frame = rate // 50
    rms = [float(np.sqrt(np.mean(samples[i:i + frame] ** 2))) for i in range(0, len(samples) - frame, frame)]
    return sum(1 for r in rms if r > threshold) / 50


def test_a_phone_call_to_the_agent(stack, tmp_path):
    """baresip calls the gateway in front of the real stack: the question is heard and answered,
    and the phone records the agent's voice."""
    gateway = GatewayProcess(stack)
    wav = caller_wav(tmp_path, "What is the capital of France?", lead_s=6.0, tail_s=60.0)
    phone = Phone(tmp_path, "phone", wav)
    try:
        phone.dial(f"sip:agent@127.0.0.1:{gateway.port}")
        gateway.wait_for(lambda: gateway.events("confirmed"), 60, "the call to be answered")
        ended = gateway.wait_for(
            lambda: [e for e in gateway.events("agent_turn_ended") if e["turn"] >= 1] or gateway.events("ended"),
            180, "the agent's answer")
        transcripts = gateway.events("transcript")
        # (tiny.en on 8 kHz G.711 sometimes writes the homophone: "What in the capitol on France?")
        assert any({"capital", "capitol"} & set(words(e["text"])) for e in transcripts), transcripts
        if not gateway.events("ended"):  # the agent did not hang up itself: the caller does
            time.sleep(6)  # the answer plays out (the edge sends it at most 300 ms ahead)
            phone.command("hangup")
        gateway.wait_for(lambda: gateway.events("ended"), 30, "the call to end")
        assert "terminated" in phone.log() or "closed" in phone.log(), phone.log()[-2000:]
    finally:
        phone.stop()
        gateway.stop()
    end = gateway.events("ended")[0]
    assert end["reason"] in ("the caller hung up", "the agent ended the call"), end
    media = gateway.events("media")[0]
    assert media["packets_in"] > 100 and media["speech_frames_sent"] > 50, media
    metrics = [e for e in gateway.events("turn_metrics") if e["turn"] >= 1]
    assert metrics and metrics[0]["voice_to_voice_ms"] > 0, gateway.events()
    print(f"\nvoice-to-voice through the gateway: {metrics[0]['voice_to_voice_ms']:.0f} ms "
          f"(answer {ended[0].get('text', '')!r})")
    # What the phone heard: the disclosure and the answer, as speech.
    recording = phone.recording()
    assert recording is not None, list(phone.records.iterdir())
    assert voiced_seconds(recording) >= 2.0, voiced_seconds(recording)
    from voicestack.stt.engine import WhisperEngine
    heard = WhisperEngine().transcribe(read_wav(recording))
    print(f"the phone heard: {heard!r}")
    assert {"ai", "assistant"} & set(words(heard)), heard
    answer_words = {w for w in words(ended[0].get("text", "")) if len(w) > 3}
    assert not answer_words or answer_words & set(words(heard)), (heard, answer_words)


async def test_dtmf_from_a_phone_reaches_the_agent(fake_edge, gateway_factory, tmp_path):
    """baresip presses 4, 2, #: RFC 4733 events, logged, and sent to the edge as Dtmf."""
    gateway = await gateway_factory()
    wav = caller_wav(tmp_path, "Hello.", lead_s=0.5, tail_s=30.0)
    phone = Phone(tmp_path, "dtmf-phone", wav)
    phone.dial(f"sip:agent@127.0.0.1:{gateway.ports['udp']}")
    try:
        for _ in range(300):
            if any(e["kind"] == "confirmed" for e in gateway.events):
                break
            await asyncio.sleep(0.1)
        assert any(e["kind"] == "confirmed" for e in gateway.events), phone.log()[-2000:]
        await asyncio.sleep(0.5)
        for digit in "42#":
            await asyncio.to_thread(phone.command, "sndcode", digit)
            await asyncio.sleep(0.4)
        for _ in range(100):
            if len(fake_edge.dtmf) >= 3:
                break
            await asyncio.sleep(0.1)
        assert [e["digit"] for e in gateway.events if e["kind"] == "dtmf"] == ["4", "2", "#"], gateway.events
        assert fake_edge.dtmf == ["4", "2", "#"]
        await asyncio.to_thread(phone.command, "hangup")
        for _ in range(100):
            if any(e["kind"] == "ended" for e in gateway.events):
                break
            await asyncio.sleep(0.1)
        assert [e["reason"] for e in gateway.events if e["kind"] == "ended"] == ["the caller hung up"]
    finally:
        await asyncio.to_thread(phone.stop)


@pytest.fixture(scope="module")
def cheap_stack(tmp_path_factory):
    with Stack(ports="free", log_dir=tmp_path_factory.mktemp("logs-sip-cheap"), env=CHEAP_ENV) as running:
        running.start(START_ORDER)
        yield running


def test_five_phone_calls_at_once(cheap_stack, tmp_path):
    gateway = GatewayProcess(cheap_stack, sip_capacity=5)
    wav = caller_wav(tmp_path, "What is the capital of France?", lead_s=2.0, tail_s=60.0)
    phones = [Phone(tmp_path, f"phone{i}", wav) for i in range(5)]
    try:
        for phone in phones:
            phone.dial(f"sip:agent@127.0.0.1:{gateway.port}")
        gateway.wait_for(lambda: len(gateway.events("confirmed")) == 5, 90, "five answered calls")
        gateway.wait_for(lambda: len({e["call"] for e in gateway.events("agent_turn_ended") if e["turn"] >= 1}) == 5,
                         180, "an answer in each call")
        time.sleep(4)  # the answers play out
        for phone in phones:
            phone.command("hangup")
        gateway.wait_for(lambda: len(gateway.events("ended")) == 5, 60, "five calls to end")
    finally:
        for phone in phones:
            phone.stop()
        assert gateway.stop() == 0
    ended = gateway.events("ended")
    assert all(e["reason"] == "the caller hung up" for e in ended), ended
    assert not gateway.events("refused")
    for media in gateway.events("media"):
        # The agent's (silent, cheap) audio went out as RTP, the caller's came in.
        assert media["speech_frames_sent"] > 0 and media["packets_in"] > 100, media
    for phone in phones:
        recording = phone.recording()
        assert recording is not None, phone.log()[-2000:]
        with wave.open(str(recording)) as heard:
            assert heard.getnframes() / heard.getframerate() > 3.0
        assert re.search(r"Call established", phone.log()), phone.log()[-2000:]
