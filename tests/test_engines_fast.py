"""Engine-module logic that needs no model: the benchmarks-only stand-ins and how each
stage's `build_engine` picks them, the pure helpers the baseline shares with the stages,
and how OpenAIEngine reports a model server that lets it down mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import socket
import struct

import grpc
import numpy as np
import pytest

from voicestack import audio, config
from voicestack.config import Settings
from voicestack.errors import as_stage_error
from voicestack.llm import engine as llm
from voicestack.llm.engine import LlmUnavailable, OpenAIEngine
from voicestack.stt import engine as stt
from voicestack.tts import engine as tts
from voicestack.vad import engine as vad

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
DELTAS = ["Par", "is"]  # what the test server streams before it lets the client down


def test_cheap_settings_build_the_stand_ins_in_each_engine_module():
    cheap = Settings(cheap_engines=True)
    assert isinstance(vad.build_engine(cheap), vad.EnergyVad)
    assert isinstance(stt.build_engine(cheap), stt.FixedStt)
    assert isinstance(llm.build_engine(cheap), llm.FixedLlm)
    assert isinstance(tts.build_engine(cheap), tts.SilentTts)
    assert importlib.util.find_spec("voicestack.cheap") is None  # one home for each stand-in


def test_unknown_llm_engine_is_named():
    with pytest.raises(SystemExit, match="'vllm'.*llamacpp or openai"):
        llm.build_engine(Settings(llm_engine="vllm"))
    with pytest.raises(SystemExit, match="--llm-url"):
        llm.build_engine(Settings(llm_engine="openai"))


async def test_cheap_engines_keep_the_real_interfaces():
    rate = 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)).astype(np.float32)
    audio = np.concatenate([np.zeros(rate // 2, np.float32), tone, np.zeros(rate, np.float32)])
    pcm = (audio * 32767).astype("<i2").tobytes()
    stream = vad.EnergyVad().open(min_silence_ms=300, min_speech_ms=100)
    events = [e for i in range(0, len(pcm), 640) for e in stream.feed(pcm[i: i + 640])] + stream.flush()
    assert all(isinstance(e, vad.VadEvent) for e in events)
    assert [e.type for e in events] == [vad.STARTED, vad.ENDED]
    assert abs(events[0].offset_ms - 500) <= 32 and abs(events[1].offset_ms - 1500) <= 32

    assert stt.FixedStt().transcribe(audio) == stt.TRANSCRIPT
    assert stt.FixedStt().transcribe(audio[:800]) == ""

    deltas = [d async for d in llm.FixedLlm().stream([{"role": "user", "content": "hi"}], 80, 0.3)]
    assert "".join(d.text for d in deltas) == llm.REPLY and deltas[-1].finish_reason == "stop"
    assert len(deltas) > 3 and deltas[-1].completion_tokens == len(llm.REPLY.split())

    silent = tts.SilentTts()
    assert silent.default_voice in silent.voices() and silent.sample_rate == 24000
    out = silent.synthesize("Hello there.")
    assert out.dtype == np.int16 and not out.any() and len(out) == int(12 * tts.SECONDS_PER_CHAR * 24000)
    assert len(silent.synthesize("   ")) == 0


def test_split_clauses_waits_for_a_clause_worth_saying():
    ready, rest = tts.split_clauses("Yes, it is. The capital of France, as you know, is Par")
    assert ready == ["Yes, it is.", "The capital of France,"] and rest == "as you know, is Par"
    assert tts.split_clauses(rest, final=True) == (["as you know, is Par"], "")
    assert tts.split_clauses("One, two three four, five. Six", clauses=False) == (["One, two three four, five."], "Six")


def test_the_first_unit_of_a_reply_ends_at_its_first_natural_break():
    """#18: the caller waits for the first unit; later ones keep whole clauses."""
    assert tts.split_clauses("Sure, the capital is Paris. It", first=True) == (["Sure,", "the capital is Paris."], "It")
    assert tts.split_clauses("Sure, the capital is Paris. It") == (["Sure, the capital is Paris."], "It")
    # A long first sentence breaks before a word that starts a phrase, never before FIRST_UNIT_WORDS.
    long = "Paris is the capital of France and its largest city, with"
    assert tts.split_clauses(long, first=True) == (["Paris is the capital of France", "and its largest city,"], "with")
    assert tts.split_clauses("Paris and Lyon are cities and", first=True) == ([], "Paris and Lyon are cities and")
    # ... not inside a number, and a bracket starts a phrase too; with no break at all, at ten words.
    moon = "The moon is about three hundred and eighty four thousand kilometres away from the Earth."
    assert tts.split_clauses(moon, first=True) == (
        ["The moon is about three hundred and eighty four thousand", "kilometres away from the Earth."], "")
    assert tts.split_clauses("The moon is approximately 250,768.143 miles (about 409,626 km) away.", first=True) == (
        ["The moon is approximately 250,768.143 miles", "(about 409,626 km) away."], "")
    assert tts.split_clauses("one two three four five six seven eight nine ten", first=True)[0] == []  # the 10th may go on
    # A sentence end is complete when written, not at the next token; one that may go on waits.
    assert tts.split_clauses("Paris is the capital of France.") == (["Paris is the capital of France."], "")
    for going_on in ("The answer is 3.", "Ask Dr.", "That is, e.g.", "Plan B."):
        assert tts.split_clauses(going_on) == ([], going_on), going_on
    assert tts.split_clauses("It costs 3.5 euros.") == (["It costs 3.5 euros."], "")
    # Sentence mode keeps whole sentences, the first too.
    assert tts.split_clauses("Sure, it is. No", clauses=False, first=True) == (["Sure, it is."], "No")


def test_trim_quiet_keeps_a_short_lead_in_and_pause():
    rate = 24000
    loud = np.full(rate // 10, 10000, np.int16)  # 100 ms
    pcm = np.concatenate([np.zeros(rate // 2, np.int16), loud, np.zeros(rate, np.int16)])
    trimmed = audio.trim_quiet(pcm, rate, lead_ms=60, tail_ms=250)
    assert len(trimmed) == int(0.06 * rate) + len(loud) + int(0.25 * rate)
    assert np.array_equal(trimmed[int(0.06 * rate): int(0.06 * rate) + len(loud)], loud)
    assert len(audio.trim_quiet(pcm, rate, lead_ms=60)) == len(pcm) - int(0.44 * rate)  # the end left as it was
    silent = np.zeros(rate, np.int16)
    assert audio.trim_quiet(silent, rate, 60, 250) is silent  # nothing loud: nothing to cut against


def test_cpu_share_reads_the_containers_cpu_limit(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert config.cpu_share(str(tmp_path)) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no limit: the CPUs it may run on
    assert config.cpu_share(str(tmp_path)) == len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert config.cpu_share(str(tmp_path)) == 1


def test_decode_schedule_decodes_at_a_pause_and_then_has_the_final():
    loud = (np.full(1600, 8000, "<i2")).tobytes()  # 100 ms
    quiet = bytes(len(loud))
    schedule = stt.DecodeSchedule(pause_decode=True, interim=False)
    for _ in range(5):
        schedule.add(loud)
    assert not schedule.due(0)
    schedule.add(quiet)
    assert not schedule.due(0)  # 100 ms of quiet is not yet a pause
    schedule.add(quiet)
    assert schedule.due(0)
    covers = schedule.length
    assert schedule.final(covers) and not schedule.due(covers)
    schedule.add(loud)  # the speaker went on: that decode is no longer the final one
    assert not schedule.final(covers)


# ------------------------------------------------ OpenAIEngine against a failing server


def _event(text: str) -> bytes:
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@contextlib.asynccontextmanager
async def failing_chat_server(ending: str):
    """An OpenAI-compatible /v1/chat/completions that streams DELTAS, waits for `drop`, then:
      close     ends the connection in the middle of the chunked body
      reset     resets the connection (RST)
      stall     sends nothing more
      eof       ends a close-delimited body cleanly, but with no finish_reason sent
      cut_line  ends a close-delimited body halfway through an SSE line
      http_503  (instead of streaming) answers 503
    Yields (base_url, drop)."""
    drop, done = asyncio.Event(), asyncio.Event()

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(re.search(rb"content-length: *(\d+)", head, re.I).group(1)))
        if ending == "http_503":
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\nConnection: close\r\n\r\noverloaded")
            await writer.drain()
            writer.close()
            return
        chunked = ending in ("close", "reset", "stall")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     + (b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Connection: close\r\n\r\n"))
        for text in DELTAS:
            event = _event(text)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)
        await writer.drain()
        await drop.wait()
        if ending == "reset":
            # Linger 0: closing sends RST, not FIN.
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if ending == "stall":
            await done.wait()
        elif ending == "cut_line":
            writer.write(_event("lost")[:30])
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", drop
    finally:
        done.set()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("ending, says", [
    ("close", "RemoteProtocolError"), ("reset", "ReadError"), ("stall", "ReadTimeout"),
    ("eof", "without a finish_reason"), ("cut_line", "malformed chunk"),
])
async def test_openai_stream_let_down_mid_way_is_unavailable_after_the_deltas(ending, says):
    async with failing_chat_server(ending) as (url, drop):
        engine = OpenAIEngine(url, "m", timeout=0.5)
        got = []
        with pytest.raises(LlmUnavailable, match=says) as err:
            async for delta in engine.stream(QUESTION, max_tokens=8, temperature=0.0):
                got.append(delta.text)
                if len(got) == len(DELTAS):
                    drop.set()
        await engine.aclose()
    assert got == DELTAS
    # UNAVAILABLE, through the stage's mapping too: the edge fails over to another replica.
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert as_stage_error(err.value, "llm").code == grpc.StatusCode.UNAVAILABLE


async def test_openai_error_status_is_unavailable():
    async with failing_chat_server("http_503") as (url, _):
        engine = OpenAIEngine(url, "m", timeout=0.5)
        with pytest.raises(LlmUnavailable, match="HTTP 503: overloaded") as err:
            [d async for d in engine.stream(QUESTION, max_tokens=8, temperature=0.0)]
        await engine.aclose()
    assert as_stage_error(err.value, "llm").code == grpc.StatusCode.UNAVAILABLE
