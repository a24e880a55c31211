"""What each gateway adds to a turn, against direct gRPC: mouth-to-ear on loopback.

One stack on the embedded models (free ports) with both gateways in front of its edge, started
by the launcher as `voicestack up --web --sip` starts them, with the edge's disclosure off (so
the only agent audio in a call is the answer; the disclosure, late on a busy machine, was
taken for it). The same question (espeak-ng, after LEAD_S of silence) is asked by three
callers in turn, the order rotating each round:

  grpc  voicestack.client.converse straight to the edge (16 kHz PCM16, 20 ms frames)
  sip   a phone in this process: SIP over UDP (INVITE, ACK, BYE), RTP G.711 mu-law at 8 kHz in
        20 ms packets; no jitter buffer of its own (a packet is heard when it arrives)
  web   an aiortc peer in this process, as the page is one: POST /token and /offer, the WAV as
        its microphone track (Opus), the agent's track decoded as it arrives (aiortc's jitter
        buffer), the events on the data channel

mouth = when the question's last speech sample was sent (each caller paces its audio in real
time from its first frame); ear = when the answer's first audible sample (|x| > 2% of full
scale) is played: for the gateways, which pace their audio in real time, the arrival of the
packet or frame holding it (plus its place in it); for gRPC, where audio comes up to
audio_lead_ms ahead, a player that starts at the first chunk and plays in real time. The
edge's own voice-to-voice (TurnMetrics) is taken per call too: `mouth-to-ear - edge v2v` is
what the path outside the edge adds (transport, the gateway, pacing, the TTS audio's quiet
start), and it does not carry the models' run-to-run noise, which on a few turns is larger
than what a gateway adds.

  python -m load.gateways --rounds 3 [--json build/gateways.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import struct
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from load.speech import speak
from load.stats import fmt_ms, percentile, table, write_json
from voicestack.audio import PIPELINE_RATE, float_to_pcm16, resample

LEAD_S = 2.0  # silence before the question (the call settles)
ANSWER_TIMEOUT_S = 60.0
AUDIBLE = 0.02
PATHS = ("grpc", "sip", "web")
QUESTION = "What is the capital of France?"


def caller_audio(question: np.ndarray) -> tuple[np.ndarray, float]:
    """LEAD_S of silence then the question (16 kHz float), and where its speech ends (s)."""
    audio = np.concatenate([np.zeros(int(PIPELINE_RATE * LEAD_S), np.float32), question])
    loud = np.flatnonzero(np.abs(audio) > AUDIBLE * np.abs(audio).max())
    return audio, (loud[-1] + 1) / PIPELINE_RATE


def first_audible(samples: np.ndarray) -> int | None:
    loud = np.flatnonzero(np.abs(samples) > AUDIBLE)
    return int(loud[0]) if loud.size else None


# ---------------------------------------------------------------- direct gRPC

async def via_grpc(address: str, audio: np.ndarray, mouth_s: float) -> dict:
    from voicestack.client import converse

    chunks: list[tuple[float, bytes, int]] = []

    def on_event(event):
        if event.WhichOneof("kind") == "agent_audio" and event.agent_audio.turn_index >= 1:
            chunks.append((time.monotonic(), event.agent_audio.audio.pcm, event.agent_audio.audio.sample_rate_hz))

    start = time.monotonic()  # converse paces its frames from here (plus the channel's connect)
    conversation = await converse(address, audio, on_event=on_event, timeout=ANSWER_TIMEOUT_S + 30)
    turn = conversation.turns.get(1)
    ear, play_at = None, None
    for arrival, pcm, rate in chunks:  # a player that starts at the first chunk, real time
        rate = rate or conversation.output_rate
        samples = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
        play_at = arrival if play_at is None else max(arrival, play_at)
        if (index := first_audible(samples)) is not None:
            ear = play_at + index / rate
            break
        play_at += samples.size / rate
    return {"mouth_to_ear_ms": (ear - start - mouth_s) * 1000 if ear else None,
            "edge_v2v_ms": turn.metrics.voice_to_voice_ms if turn and turn.metrics else None,
            "heard": turn.transcript if turn else "", "status": conversation.status.name}


# ---------------------------------------------------------------- SIP + RTP

class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram):
        self.on_datagram = on_datagram

    def datagram_received(self, data, addr):
        self.on_datagram(data, time.monotonic())


def sip_request(method: str, port: int, local: int, call_id: str, cseq: int, to_tag: str = "",
                body: str = "") -> bytes:
    lines = [f"{method} sip:agent@127.0.0.1:{port} SIP/2.0",
             f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{secrets.token_hex(8)};rport",
             "Max-Forwards: 70", f"From: <sip:bench@127.0.0.1>;tag=b{call_id[:8]}",
             f"To: <sip:agent@127.0.0.1>{';tag=' + to_tag if to_tag else ''}", f"Call-ID: {call_id}",
             f"CSeq: {cseq} {method}", f"Contact: <sip:bench@127.0.0.1:{local}>"]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def gateway_events(log_path: Path, call_id: str) -> list[dict]:
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        if " EVENT " in line:
            event = json.loads(line.split(" EVENT ", 1)[1])
            if event.get("call") == call_id:
                found.append(event)
    return found


async def via_sip(port: int, log_path: Path, audio: np.ndarray, mouth_s: float) -> dict:
    from aiortp import get_codec

    codec = get_codec(0)  # PCMU
    loop = asyncio.get_running_loop()
    phone_rate = 8000
    pcm = float_to_pcm16(resample(audio, PIPELINE_RATE, phone_rate))
    frame_bytes = phone_rate // 50 * 2
    sip_in: asyncio.Queue = asyncio.Queue()
    heard: dict = {"ear": None}
    started: dict = {"t0": None}

    def on_rtp(data: bytes, arrival: float) -> None:
        if len(data) < 12 or data[1] & 0x7F != 0 or heard["ear"] is not None or started["t0"] is None:
            return
        offset = 12 + 4 * (data[0] & 0x0F)
        samples = np.frombuffer(codec.decode(data[offset:]), "<i2").astype(np.float32) / 32768
        if arrival > started["t0"] + mouth_s and (index := first_audible(samples)) is not None:
            heard["ear"] = arrival + index / phone_rate

    sip, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(lambda d, _t: sip_in.put_nowait(d)),
                                                 local_addr=("127.0.0.1", 0))
    rtp, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(on_rtp), local_addr=("127.0.0.1", 0))
    local, rtp_port = sip.get_extra_info("sockname")[1], rtp.get_extra_info("sockname")[1]
    call_id = secrets.token_hex(10)
    offer = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
             f"m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
             "a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n")
    sending = None
    try:
        sip.sendto(sip_request("INVITE", port, local, call_id, 1, body=offer), ("127.0.0.1", port))
        while True:
            response = (await asyncio.wait_for(sip_in.get(), 30)).decode(errors="replace")
            code = int(response.split(" ", 2)[1])
            if code >= 200:
                break
        if code != 200:
            return {"mouth_to_ear_ms": None, "edge_v2v_ms": None, "heard": "", "status": f"SIP {code}"}
        to_tag = re.search(r"^To:.*;tag=([^;\s]+)", response, re.M | re.I)[1]
        remote = ("127.0.0.1", int(re.search(r"^m=audio (\d+)", response, re.M)[1]))
        sip.sendto(sip_request("ACK", port, local, call_id, 1, to_tag), ("127.0.0.1", port))

        async def send_rtp():
            ssrc, seq, sent = secrets.randbits(32), secrets.randbits(16), 0
            started["t0"] = start = time.monotonic()
            while True:  # the question, then an open line (silence) until the call ends
                chunk = pcm[sent * frame_bytes:(sent + 1) * frame_bytes].ljust(frame_bytes, b"\0")
                header = struct.pack("!BBHII", 0x80, (0x80 if sent == 0 else 0), (seq + sent) & 0xFFFF,
                                     (sent * 160) & 0xFFFFFFFF, ssrc)
                rtp.sendto(header + codec.encode(chunk), remote)
                sent += 1
                await asyncio.sleep(max(0.0, start + sent * 0.02 - time.monotonic()))

        sending = asyncio.create_task(send_rtp())
        deadline = time.monotonic() + LEAD_S + ANSWER_TIMEOUT_S
        metrics = []
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            metrics = [e for e in gateway_events(log_path, call_id) if e["kind"] == "turn_metrics" and e["turn"] >= 1]
            if heard["ear"] is not None and metrics:
                break
        transcripts = [e["text"] for e in gateway_events(log_path, call_id) if e["kind"] == "transcript"]
        t0 = started["t0"]
        return {"mouth_to_ear_ms": (heard["ear"] - t0 - mouth_s) * 1000 if heard["ear"] else None,
                "edge_v2v_ms": metrics[0]["voice_to_voice_ms"] if metrics else None,
                "heard": transcripts[0] if transcripts else "", "status": "OK"}
    finally:
        if sending is not None:
            sending.cancel()
            sip.sendto(sip_request("BYE", port, local, call_id, 2, to_tag), ("127.0.0.1", port))
            await asyncio.sleep(0.3)
        sip.close()
        rtp.close()


# ---------------------------------------------------------------- WebRTC (aiortc)

async def via_web(url: str, audio: np.ndarray, mouth_s: float) -> dict:
    import av
    from aiohttp import ClientSession
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    rate, samples_per_frame = 48000, 960
    pcm = float_to_pcm16(resample(audio, PIPELINE_RATE, rate))
    started: dict = {"t0": None}

    class Microphone(MediaStreamTrack):
        kind = "audio"

        def __init__(self):
            super().__init__()
            self.sent = 0

        async def recv(self):
            if started["t0"] is None:
                started["t0"] = time.monotonic()
            else:
                await asyncio.sleep(max(0.0, started["t0"] + self.sent * 0.02 - time.monotonic()))
            piece = pcm[self.sent * samples_per_frame * 2:(self.sent + 1) * samples_per_frame * 2]
            frame = av.AudioFrame(format="s16", layout="mono", samples=samples_per_frame)
            frame.planes[0].update(piece.ljust(samples_per_frame * 2, b"\0"))
            frame.sample_rate, frame.time_base = rate, Fraction(1, rate)
            frame.pts = self.sent * samples_per_frame
            self.sent += 1
            return frame

    events: list[dict] = []
    heard: dict = {"ear": None}
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    listening: list[asyncio.Task] = []

    async def listen(track):
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            arrival = time.monotonic()
            if heard["ear"] is not None or started["t0"] is None or arrival < started["t0"] + mouth_s:
                continue
            channels = len(frame.layout.channels)
            samples = frame.to_ndarray().reshape(-1).astype(np.float32) / 32768
            if (index := first_audible(samples)) is not None:
                heard["ear"] = arrival + index // channels / frame.sample_rate

    pc.on("track", lambda track: listening.append(asyncio.ensure_future(listen(track))))
    pc.addTrack(Microphone())
    channel = pc.createDataChannel("events")
    channel.on("message", lambda message: events.append(json.loads(message)))
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with ClientSession() as http:
            token = (await (await http.post(f"{url}token")).json())["token"]
            response = await http.post(f"{url}offer", json={"type": "offer", "sdp": pc.localDescription.sdp,
                                                            "token": token})
            if response.status != 200:
                return {"mouth_to_ear_ms": None, "edge_v2v_ms": None, "heard": "",
                        "status": f"HTTP {response.status} {await response.text()}"}
            answer = await response.json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        deadline = time.monotonic() + LEAD_S + ANSWER_TIMEOUT_S
        metrics = []
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            metrics = [e for e in events if e["type"] == "turn_metrics" and e["turn_index"] >= 1]
            if heard["ear"] is not None and metrics:
                break
        finals = [e["text"] for e in events if e["type"] == "transcript" and e.get("is_final")]
        t0 = started["t0"]
        return {"mouth_to_ear_ms": (heard["ear"] - t0 - mouth_s) * 1000 if heard["ear"] and t0 else None,
                "edge_v2v_ms": metrics[0]["voice_to_voice_ms"] if metrics else None,
                "heard": finals[0] if finals else "", "status": "OK"}
    finally:
        for task in listening:
            task.cancel()
        await pc.close()


# ---------------------------------------------------------------- the run

async def bench(stack, rounds: int, question: np.ndarray) -> list[dict]:
    audio, mouth_s = caller_audio(question)
    edge, web, sip = stack.processes["edge"], stack.processes["web"], stack.processes["sip"]
    callers = {"grpc": lambda: via_grpc(edge.address, audio, mouth_s),
               "sip": lambda: via_sip(sip.grpc_port, sip.log_path, audio, mouth_s),
               "web": lambda: via_web(web.url, audio, mouth_s)}
    print("warm-up call (not counted)...", flush=True)
    await callers["grpc"]()
    calls = []
    for r in range(rounds):
        for path in PATHS[r % 3:] + PATHS[:r % 3]:
            result = {"round": r + 1, "path": path, **await callers[path]()}
            m2e, v2v = result["mouth_to_ear_ms"], result["edge_v2v_ms"]
            result["outside_edge_ms"] = m2e - v2v if m2e is not None and v2v is not None else None
            calls.append(result)
            print(f"  round {r + 1} {path:<4}  mouth-to-ear {fmt_ms(m2e):>6} ms  edge v2v "
                  f"{fmt_ms(v2v):>6} ms  heard {result['heard']!r}  {result['status']}", flush=True)
            await asyncio.sleep(1.0)
    return calls


def summary(calls: list[dict]) -> tuple[list[str], list[list[str]]]:
    def p50(path, key):
        values = [c[key] for c in calls if c["path"] == path and c[key] is not None]
        return percentile(values, 50) if values else float("nan")

    base = p50("grpc", "outside_edge_ms")
    rows = []
    for path in PATHS:
        ok = [c for c in calls if c["path"] == path and c["outside_edge_ms"] is not None]
        outside = [c["outside_edge_ms"] for c in ok]
        rows.append([path, f"{len(ok)}/{sum(c['path'] == path for c in calls)}", fmt_ms(p50(path, "mouth_to_ear_ms")),
                     fmt_ms(p50(path, "edge_v2v_ms")), fmt_ms(p50(path, "outside_edge_ms")),
                     f"{fmt_ms(min(outside))}-{fmt_ms(max(outside))}" if outside else "-",
                     "-" if path == "grpc" else f"{p50(path, 'outside_edge_ms') - base:+.0f} ms"])
    return (["path", "calls ok", "mouth-to-ear p50", "edge v2v p50", "outside the edge p50", "outside the edge range",
             "added vs gRPC (p50)"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load.gateways", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="calls per path (one each per round)")
    parser.add_argument("--json", default="", help="write every call and the summary here")
    parser.add_argument("--log-dir", default="build/logs-gateways")
    args = parser.parse_args(argv)

    from voicestack.launcher import START_ORDER, Stack, free_port

    load_at_start = open("/proc/loadavg").read().split()[:3]
    base = 30000 + free_port() % 250 * 100  # an RTP range unlikely to be in use
    env = {"VOICESTACK_SIP_RTP_PORTS": f"{base}-{base + 98}", "VOICESTACK_DISCLOSURE": "false"}
    with Stack(ports="free", log_dir=args.log_dir, env=env) as stack:
        print(f"starting the stack (embedded models) and both gateways; logs in {args.log_dir}/", flush=True)
        stack.start(START_ORDER)
        stack.spawn("web")
        stack.spawn("sip")
        stack.wait_ready(["web", "sip"], timeout=60)
        calls = asyncio.run(bench(stack, args.rounds, speak(QUESTION)))
    headers, rows = summary(calls)
    load_at_end = open("/proc/loadavg").read().split()[:3]
    print()
    print(table(headers, rows))
    print(f"\nload average at start / end: {' '.join(load_at_start)} / {' '.join(load_at_end)}")
    if args.json:
        write_json(Path(args.json), {"calls": calls, "headers": headers, "rows": rows,
                                     "load_average": [load_at_start, load_at_end]})
    return 0 if all(c["outside_edge_ms"] is not None for c in calls) else 1


if __name__ == "__main__":
    sys.exit(main())
