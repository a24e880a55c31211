"""The WebRTC gateway (voicestack/web): a real browser talks to the real stack through it.

- A headless Chromium (Debian's `chromium`, driven by Playwright) opens the page, whose fake
  microphone plays an espeak-ng question; the page must show the words, play an answer that
  is speech (transcribed back by the STT stage) and draw the turn's waterfall.
- The token flow, input validation, capacity and drain, without a browser (drain with an
  aiortc client as the caller).
- `voicestack up --web --sip` prints the page's URL and the SIP URI, and both answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from conftest import speak, words
from voicestack.audio import PIPELINE_RATE, float_to_pcm16, resample, write_wav
from voicestack.config import Settings
from voicestack.launcher import Process, sip_options_ok
from voicestack.v1 import audio_pb2, stt_pb2, stt_pb2_grpc
from voicestack.web.gateway import Gateway, TokenIssuer

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
QUESTION = "What is the capital of France?"
LEAD_SILENCE_S = 6.0  # the connection is up and the disclosure played before the question
TAIL_SILENCE_S = 30.0  # longer than the answer: the question is asked once (%noloop too)
API_KEY = "test-web-key-3f9a"  # the edge here checks no keys; the gateway still hides it
BAD_SDP = "this is not an SDP offer"


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def question_wav(speech_dir) -> tuple[Path, float]:
    """The question at 48 kHz mono, between silences; and when in the file the speech ends."""
    audio = resample(speak(QUESTION, speech_dir), PIPELINE_RATE, 48000)
    lead, tail = np.zeros(int(48000 * LEAD_SILENCE_S), np.float32), np.zeros(int(48000 * TAIL_SILENCE_S), np.float32)
    path = speech_dir / "web-question.wav"
    write_wav(path, float_to_pcm16(np.concatenate([lead, 0.8 * audio, tail])), 48000)
    return path, LEAD_SILENCE_S + audio.size / 48000


def start_gateway(stack, name: str, **settings) -> Process:
    """`voicestack serve web` in front of the stack's edge (the launcher starts it), on a free port."""
    env = {"VOICESTACK_API_KEY": API_KEY, **{f"VOICESTACK_{k.upper()}": str(v) for k, v in settings.items()}}
    process = stack.spawn("web", name=name, env=env)
    stack.wait_ready([name], timeout=60)
    return process


@pytest.fixture(scope="module")
def gateway_url(stack):
    process = start_gateway(stack, "web-browser-test", drain_seconds=5)
    yield process.url.rstrip("/")
    stack.stop(process.name)
    print(process.log_path.read_text()[-3000:])


def chromium_args(wav: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required"]


async def transcribe(stt_address: str, pcm: bytes) -> str:
    import grpc

    async def requests():
        yield stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(sample_rate_hz=PIPELINE_RATE))
        step = PIPELINE_RATE // 10 * 2
        for i in range(0, len(pcm), step):
            yield stt_pb2.TranscribeRequest(audio=audio_pb2.AudioChunk(pcm=pcm[i:i + step]))

    async with grpc.aio.insecure_channel(stt_address) as channel:
        results = [r async for r in stt_pb2_grpc.SttServiceStub(channel).Transcribe(requests(), timeout=120)]
    return results[-1].text if results else ""


# ---------------------------------------------------------------- the browser

@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")
async def test_browser_asks_and_hears_the_answer(gateway_url, stack, question_wav, tmp_path):
    from playwright.async_api import async_playwright

    wav, question_end_s = question_wav
    console = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=chromium_args(wav))
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 900})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            await page.goto(f"{gateway_url}/?record=1")
            assert await page.locator("#state").inner_text() == "not connected"
            await page.click("#talk")
            try:
                await page.wait_for_function(
                    """() => { const e = window.voicestackEvents;
                               return e.some(x => x.type === 'agent_turn_ended' && x.turn_index >= 1)
                                   && e.some(x => x.type === 'turn_trace' && x.turn_index >= 1); }""",
                    timeout=180_000, polling=250)
            finally:
                events = await page.evaluate("window.voicestackEvents")
                print("\n".join(json.dumps(e)[:240] for e in events if e["type"] != "agent_text"))
                print("\n".join(console))
            # Let the answer play out: the recording ends in silence after enough speech.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rms = await page.evaluate("window.voicestackAudioRms(0.5)")
                if len(rms) > 4 and max(rms[-3:]) < 0.005 and sum(r > 0.02 for r in rms) >= 4:
                    break
                await asyncio.sleep(0.5)
            events = await page.evaluate("window.voicestackEvents")
            pcm = base64.b64decode(await page.evaluate("window.voicestackAudioPcm16(16000)"))
            state = await page.locator("#state").inner_text()
            user_final = await page.locator(".turn[data-turn='1'] .bubble.user.final").inner_text()
            agent_reply = await page.locator(".turn[data-turn='1'] .bubble.agent").inner_text()
            bars = await page.locator(".turn[data-turn='1'] .waterfall .bar").count()
            errors = await page.locator("#errors").inner_text()
            shot = tmp_path / "web-test.png"
            await page.screenshot(path=str(shot), full_page=True)
            (REPO / "build").mkdir(exist_ok=True)
            shutil.copy(shot, REPO / "build" / "web-test.png")
            await page.click("#talk")  # hang up
        finally:
            await browser.close()

    by_type = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event)
    assert "connected" in state, state
    assert not errors.strip(), errors
    assert not [e for e in by_type.get("error", [])], by_type["error"]
    # The question's words: the final transcript, on the page.
    finals = [e["text"] for e in by_type["transcript"] if e.get("is_final") and e["turn_index"] == 1]
    assert finals and "capital" in words(finals[0]), finals
    assert "capital" in words(user_final), user_final
    # The answer: captions, and audio that is speech.
    reply = next(e["text"] for e in by_type["agent_turn_ended"] if e["turn_index"] == 1)
    assert reply and words(agent_reply) == words(reply), (agent_reply, reply)
    samples = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    window = PIPELINE_RATE // 2
    rms = [float(np.sqrt(np.mean(samples[i:i + window] ** 2))) for i in range(0, samples.size - window, window)]
    loud = sum(r > 0.02 for r in rms)
    assert loud >= 4, rms  # over 2 s of the disclosure and the answer, well above silence
    assert min(rms) < 0.005, rms  # and silence between (a paced stream, not noise)
    heard = await transcribe(stack.processes["stt"].address, pcm)
    print(f"received audio ({samples.size / PIPELINE_RATE:.1f} s, {loud} loud half-seconds) transcribed: {heard!r}")
    print(f"the agent said: {reply!r}")
    assert "assistant" in words(heard), heard  # the disclosure, through WebRTC
    reply_words = {w for w in words(reply) if len(w) > 3}
    assert reply_words & set(words(heard)), (heard, reply)  # and the answer
    # The waterfall: a bar per span of the turn's trace.
    spans = next(e["spans"] for e in by_type["turn_trace"] if e["turn_index"] == 1)
    assert bars == len(spans) >= 3, (bars, spans)
    # Latency: the edge's voice-to-voice (end of speech in the audio it got -> its first agent
    # audio out), and mouth-to-ear on the page's clock: the fake microphone starts its file when
    # capture opens, the recording starts at the remote track; the answer's onset is the first
    # loud sample near the gateway's playout_started for the turn. Their difference is what the
    # browser's capture, WebRTC both ways and the gateway add (a rough estimate: the fake
    # device's start and the recording's start are taken from page events).
    metrics = next(e for e in by_type["turn_metrics"] if e["turn_index"] == 1)
    assert metrics["voice_to_voice_ms"] > 0
    playout = next(e for e in by_type["playout_started"] if e["turn_index"] == 1)
    track_at = by_type["remote_track"][0]["t"]
    question_end_at = by_type["microphone_open"][0]["t"] + question_end_s * 1000
    search_from = int(max(0, playout["t"] - track_at - 500) / 1000 * PIPELINE_RATE)
    onset = np.flatnonzero(np.abs(samples[search_from:]) > 0.02)
    if onset.size:
        answer_at = track_at + (search_from + onset[0]) / PIPELINE_RATE * 1000
        mouth_to_ear = answer_at - question_end_at
        print(f"voice-to-voice (edge, TurnMetrics): {metrics['voice_to_voice_ms']:.0f} ms; mouth-to-ear on the page: "
              f"{mouth_to_ear:.0f} ms (so the browser, WebRTC and the gateway add about "
              f"{mouth_to_ear - metrics['voice_to_voice_ms']:.0f} ms); agent audio queued in the gateway "
              f"{playout['gateway_queue_ms']} ms before playout")
        audible = [e for e in by_type.get("playout_audible", []) if e["turn_index"] == 1]
        if audible:  # both ends on the page's clock (the event came by the data channel)
            print(f"first audible agent audio: out of the gateway -> heard on the page (Opus, RTP, jitter "
                  f"buffer, WebAudio): {answer_at - audible[0]['t']:.0f} ms; the TTS audio began with "
                  f"{audible[0]['offset_ms']} ms of quiet")


# ---------------------------------------------------------------- no browser: HTTP

def web_gateway(api_key: str = API_KEY, **changes) -> Gateway:
    """A gateway in process (its edge unreachable unless given): config.Settings' web_* fields,
    and the key it would read from VOICESTACK_API_KEY."""
    return Gateway(Settings(**{"web_edge_address": "127.0.0.1:1", **changes}), api_key)


async def offer_sdp() -> tuple[RTCPeerConnection, str]:
    """A real SDP offer (audio + data channel), as a browser makes one."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def post_offer(client, sdp=BAD_SDP, token=None, **extra):
    body = {"type": "offer", "sdp": sdp, **extra}
    if token is not None:
        body["token"] = token
    response = await client.post("/offer", json=body)
    return response.status, (await response.json())["error" if response.status >= 400 else "sdp"]


async def test_offer_needs_a_fresh_unused_token():
    async with TestClient(TestServer(web_gateway(web_token_ttl_seconds=0.5).app())) as client:
        status, message = await post_offer(client)
        assert status == 401 and "POST /token" in message, message

        token = (await (await client.post("/token")).json())["token"]
        assert (await post_offer(client, token=token))[0] == 400  # good token, bad SDP
        status, message = await post_offer(client, token=token)
        assert status == 401 and "already used" in message, message

        nonce, expiry, signature = (await (await client.post("/token")).json())["token"].split(".")
        status, message = await post_offer(client, token=f"{nonce}.{int(expiry) + 60_000}.{signature}")
        assert status == 401 and "not valid" in message, message  # a longer life is a forgery
        status, message = await post_offer(client, token="garbage")
        assert status == 401 and "malformed" in message, message

        token = (await (await client.post("/token")).json())["token"]
        await asyncio.sleep(0.7)
        status, message = await post_offer(client, token=token)
        assert status == 401 and "expired" in message, message

        # As a header too.
        token = (await (await client.post("/token")).json())["token"]
        response = await client.post("/offer", json={"type": "offer", "sdp": BAD_SDP},
                                     headers={"Authorization": f"Bearer {token}"})
        assert response.status == 400


async def test_the_api_key_never_reaches_the_page():
    async with TestClient(TestServer(web_gateway().app())) as client:
        bodies = []
        for method, path in [("get", "/"), ("get", "/static/app.js"), ("get", "/config"), ("post", "/token"),
                             ("get", "/healthz")]:
            response = await getattr(client, method)(path)
            assert response.status == 200, path
            bodies.append(await response.text())
        assert not any(API_KEY in body for body in bodies)
        assert json.loads(bodies[2]) == {"ice_servers": [], "token_required": True}
        assert "Content-Security-Policy" in (await client.get("/")).headers
        # A token is for the gateway's own page: another site's script gets none.
        response = await client.post("/token", headers={"Origin": "https://evil.example"})
        assert response.status == 403


def test_tokens_are_signed_and_single_use():
    clock = [1000.0]
    issuer = TokenIssuer(60, clock=lambda: clock[0])
    first, second = issuer.issue(), issuer.issue()
    assert first != second
    assert issuer.redeem(first) is None
    assert "already used" in issuer.redeem(first)
    assert "not valid" in TokenIssuer(60, clock=lambda: clock[0]).redeem(second)  # another gateway's secret
    clock[0] += 61
    assert "expired" in issuer.redeem(second)
    assert "required" in issuer.redeem("")


async def test_bad_offers_get_400_with_a_reason():
    async with TestClient(TestServer(web_gateway(api_key="").app())) as client:
        # Without an API key no token is needed: these reach validation.
        response = await client.post("/offer", data=b"{not json", headers={"Content-Type": "application/json"})
        assert response.status == 400 and "JSON" in (await response.json())["error"]
        assert (await client.post("/offer", json=["offer"])).status == 400
        status, message = await post_offer(client, type="answer")
        assert status == 400 and "offer" in message
        status, message = await post_offer(client)
        assert status == 400 and "SDP" in message, message
        status, message = await post_offer(client, sdp="v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n")
        assert status == 400 and "no audio" in message, message
        status, message = await post_offer(client, sdp="v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nm=application x\r\n")
        assert status == 400 and "SDP offer could not be used" in message, message
        response = await client.post("/offer", data=b"x" * 70_000, headers={"Content-Type": "application/json"})
        assert response.status == 413


async def test_capacity_draining_and_an_unreachable_edge_get_503():
    gateway = web_gateway(api_key="", web_capacity=1)
    async with TestClient(TestServer(gateway.app())) as client:
        pc, sdp = await offer_sdp()
        try:
            # A real offer to an edge that is not there: 503 with the reason, the place freed.
            status, message = await post_offer(client, sdp)
            assert status == 503 and "not available" in message, message
            assert not gateway.calls
            gateway.calls.add(object())  # one call open: at capacity
            response = await client.post("/offer", json={"type": "offer", "sdp": sdp})
            assert response.status == 503 and "capacity" in (await response.json())["error"]
            assert response.headers["Retry-After"]
            gateway.calls.clear()
            gateway.draining = True
            response = await client.post("/offer", json={"type": "offer", "sdp": sdp})
            assert response.status == 503 and "shutting down" in (await response.json())["error"]
            assert (await client.get("/healthz")).status == 503
        finally:
            await pc.close()


# ---------------------------------------------------------------- drain, with an aiortc caller

async def test_drain_keeps_open_calls_and_refuses_new_ones(stack):
    gateway = start_gateway(stack, "web-drain-test", drain_seconds=4)
    process, url = gateway.popen, gateway.url.rstrip("/")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    received: list[dict] = []
    try:
        pc.addTrack(AudioStreamTrack())  # a silent microphone
        channel = pc.createDataChannel("events")
        channel.on("message", lambda message: received.append(json.loads(message)))
        await pc.setLocalDescription(await pc.createOffer())
        async with ClientSession() as http:
            token = (await (await http.post(f"{url}/token")).json())["token"]
            response = await http.post(f"{url}/offer", json={"type": "offer", "sdp": pc.localDescription.sdp,
                                                            "token": token})
            assert response.status == 200, await response.text()
            answer = await response.json()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

            async def wait_for(kind, timeout=60):
                deadline = time.monotonic() + timeout
                while not any(e["type"] == kind for e in received):
                    assert time.monotonic() < deadline, (kind, received)
                    await asyncio.sleep(0.1)

            await wait_for("session_started")
            process.send_signal(signal.SIGTERM)
            await wait_for("go_away", 10)
            token = (await (await http.post(f"{url}/token")).json()).get("token")
            response = await http.post(f"{url}/offer", json={"type": "offer", "sdp": "v=0", "token": token})
            assert response.status == 503 and "shutting down" in (await response.json())["error"]
            assert process.poll() is None  # the open call goes on
            await wait_for("call_ended", 15)
        assert await asyncio.to_thread(process.wait, 15) == 0
        assert not any(e["type"] == "error" for e in received), received
    finally:
        await pc.close()
        if process.poll() is None:
            process.kill()


# ---------------------------------------------------------------- metrics, with an aiortc caller

def scrape(port: int) -> dict[str, float]:
    """The gateway's Prometheus samples with stage="web", by name."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("stage") == "web"}


async def wait_metric(port: int, name: str, value: float, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (found := (await asyncio.to_thread(scrape, port)).get(name)) != value:
        assert time.monotonic() < deadline, f"{name} is {found}, not {value}"
        await asyncio.sleep(0.2)


async def test_metrics_count_calls_for_the_autoscaler(stack):
    """`serve web` exports voicestack_streams_active / _capacity{stage="web"} on its metrics port (what
    the chart's autoscalers read): 1 during a call, 0 once the page hangs up; an offer refused at
    capacity counts as an open refused."""
    gateway = start_gateway(stack, "web-metrics-test", web_capacity=1)
    url, port = gateway.url.rstrip("/"), gateway.metrics_port
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    received: list[dict] = []
    try:
        await wait_metric(port, "voicestack_streams_capacity", 1)
        await wait_metric(port, "voicestack_streams_active", 0)
        pc.addTrack(AudioStreamTrack())
        channel = pc.createDataChannel("events")
        channel.on("message", lambda message: received.append(json.loads(message)))
        await pc.setLocalDescription(await pc.createOffer())
        async with ClientSession() as http:
            token = (await (await http.post(f"{url}/token")).json())["token"]
            response = await http.post(f"{url}/offer", json={"type": "offer", "sdp": pc.localDescription.sdp,
                                                            "token": token})
            assert response.status == 200, await response.text()
            answer = await response.json()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
            deadline = time.monotonic() + 60
            while not any(e["type"] == "session_started" for e in received):
                assert time.monotonic() < deadline, received
                await asyncio.sleep(0.1)
            await wait_metric(port, "voicestack_streams_active", 1)
            # At capacity (one call): 503, counted.
            response = await http.post(f"{url}/offer", json={"type": "offer", "sdp": "v=0"})
            assert response.status == 503 and "capacity" in (await response.json())["error"]
            await wait_metric(port, "voicestack_stream_opens_refused_total", 1)
            channel.send(json.dumps({"type": "hangup"}))
            await wait_metric(port, "voicestack_streams_active", 0)
    finally:
        await pc.close()
        stack.stop(gateway.name)


# ---------------------------------------------------------------- the agent's audio track

async def test_playout_is_paced_reported_and_dropped_on_interruption():
    from voicestack.v1 import edge_pb2
    from voicestack.web.gateway import PLAYOUT_RATE, PLAYOUT_SAMPLES, Call

    gateway = web_gateway()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    call = Call(gateway, pc)
    try:
        tone = float_to_pcm16(0.3 * np.sin(np.arange(24000) * 2 * np.pi * 440 / 24000).astype(np.float32))
        for i in range(0, len(tone), 4800):  # 1 s of agent audio for turn 1, in 100 ms chunks
            call._on_edge_event(edge_pb2.ConverseResponse(agent_audio=edge_pb2.AgentAudio(
                turn_index=1, audio=audio_pb2.AudioChunk(pcm=tone[i:i + 4800], sample_rate_hz=24000))))
        assert abs(call.player.queued_ms - 1000) < 30, call.player.queued_ms
        started = time.monotonic()
        frames = [await call.player.recv() for _ in range(25)]  # 500 ms
        assert time.monotonic() - started >= 0.45  # real time, not as fast as it can
        assert all(f.sample_rate == PLAYOUT_RATE and f.samples == PLAYOUT_SAMPLES for f in frames)
        assert min(np.abs(f.to_ndarray()).max() for f in frames[1:]) > 5000  # the tone, not silence
        reports = []
        while not call.outbox.empty():
            request = call.outbox.get_nowait()
            if request.WhichOneof("kind") == "playback":
                reports.append(request.playback.played_ms)
        assert reports and reports[-1] in range(400, 501) and reports == sorted(reports), reports
        # Barge-in: the rest of the turn's audio is dropped, silence follows at once.
        call._on_edge_event(edge_pb2.ConverseResponse(interrupted=edge_pb2.Interrupted(turn_index=1, played_ms=500)))
        assert call.player.queued_ms == 0 and 400 < call.player.dropped_ms < 600
        assert np.abs((await call.player.recv()).to_ndarray()).max() == 0
        forwarded = [json.loads(text) for text in call.pending]
        assert forwarded[-1]["type"] == "interrupted" and forwarded[-1]["gateway_dropped_ms"] > 400
        assert forwarded[0] == {"type": "playout_started", "turn_index": 1,
                                "gateway_queue_ms": forwarded[0]["gateway_queue_ms"]}
        assert forwarded[1] == {"type": "playout_audible", "turn_index": 1, "offset_ms": 0}
    finally:
        await call.close("test over")
        await gateway.close()


# ---------------------------------------------------------------- `voicestack up --web --sip`

def test_up_with_gateways_prints_where_to_reach_them(tmp_path):
    """`up --web --sip` (cheap engines: the wiring, not the models) starts the gateways after
    the edge, prints the page's URL and the SIP URI; the page answers 200, the SIP gateway 200
    to OPTIONS; SIGTERM stops everything."""
    env = {**os.environ, "VOICESTACK_CHEAP_ENGINES": "1"}
    up = subprocess.Popen([sys.executable, "-m", "voicestack", "up", "--web", "--sip", "--free-ports",
                           "--log-dir", str(tmp_path / "logs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("Call it:") for line in lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        out = "".join(lines)
        print(out)
        url = re.search(r"^Talk to it from a browser: (http://127\.0\.0\.1:\d+/)$", out, re.M)[1]
        sip_port = int(re.search(r"^Call it: sip:agent@127\.0\.0\.1:(\d+)$", out, re.M)[1])
        # The gateways come after the edge, and the table lists them ready.
        assert out.index("  edge  ready") < out.index("  web   ready") and out.index("  edge  ready") < out.index("  sip   ready")
        assert re.search(rf"^web\s+\d+\s+{re.escape(url)}\s+-\s+yes", out, re.M), out
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and "<title>voicestack" in page.read().decode()
        with urllib.request.urlopen(url + "static/app.js", timeout=10) as script:
            assert script.status == 200
        assert sip_options_ok(sip_port, timeout=2.0)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            up.kill()
        reader.join(5)
    assert up.returncode == 0, "".join(lines)
    assert "stopped." in "".join(lines)
    logs = tmp_path / "logs"
    assert "ready on http://127.0.0.1:" in (logs / "web.log").read_text()
    assert "ready on sip:agent@127.0.0.1:" in (logs / "sip.log").read_text()
