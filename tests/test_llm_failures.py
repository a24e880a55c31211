"""An LLM backend that fails mid-reply must cost at most one turn, never the call.

The LLM stage runs `--llm-engine openai` against tests/flaky_llm_server.py, scripted to
drop its stream mid-reply. A drop that a replay fixes costs nothing (the turn is answered
whole, no Error). Drops on every request of a turn, on every replica, cost that turn:
exactly one `Error` (stage "llm", UNAVAILABLE: the stage's backend went away, not a bug
of ours) and then its `AgentTurnEnded`, soon; the next question in the call is answered.

The first tests check the flaky server itself (raw HTTP, and through OpenAIEngine), so a
failure of the stack tests is the stack's, not the double's.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import pytest

from conftest import speak, words
from flaky_llm_server import DROP_AFTER_WORDS, REPLY, STALL_AFTER_WORDS, FlakyLlmServer
from voicestack.client import LiveMicrophone
from voicestack.audio import PIPELINE_RATE
from voicestack.launcher import START_ORDER, Stack
from voicestack.llm.engine import LlmUnavailable, OpenAIEngine
from voicestack.v1 import audio_pb2, edge_pb2

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
# From the end of the user's speech to the turn's AgentTurnEnded. Both stay under the 30 s
# stall timeouts, so a turn that ends only by timing out, or never, fails. A failed turn has
# endpointing, the transcript and the dropped streams (about 1 s here); an answered one also
# the TTS and the paced playback of 2.8 s of audio (about 10 s on 2 busy cores).
FAILED_TURN_BOUND_S = 10.0
ANSWERED_TURN_BOUND_S = 25.0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


# ------------------------------------------------------------ the double itself


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of an SSE stream, JSON-decoded ("[DONE]" kept as is)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list) -> str:
    return "".join(c["delta"].get("content") or "" for e in events if e != "[DONE]" for c in e["choices"])


def chat(client: httpx.Client, server: FlakyLlmServer):
    body = {"model": server.model, "messages": MESSAGES, "stream": True}
    return client.stream("POST", f"{server.url}/chat/completions", json=body)


def test_flaky_server_speaks_openai_streaming():
    with FlakyLlmServer(script=["drop_mid_stream", "error_first", "stall"], stall_seconds=30) as server, \
            httpx.Client(timeout=httpx.Timeout(5.0, read=1.0)) as client:
        models = client.get(f"{server.url}/models").json()
        assert [m["id"] for m in models["data"]] == [server.model]

        # drop_mid_stream: 3 words, then the connection ends with the chunked body unfinished.
        received = []
        with pytest.raises(httpx.RemoteProtocolError):
            with chat(client, server) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    received.append(line)
        events = [json.loads(line[5:]) for line in received if line.startswith("data:")]
        assert streamed_text(events) == " ".join(REPLY.split()[:DROP_AFTER_WORDS])
        assert not any(c.get("finish_reason") for e in events for c in e["choices"])

        # error_first: a 500 before any token.
        with chat(client, server) as response:
            assert response.status_code == 500
            assert "error" in json.loads(response.read())

        # stall: 2 words, then silence the client's read timeout ends.
        received = []
        with pytest.raises(httpx.ReadTimeout):
            with chat(client, server) as response:
                for line in response.iter_lines():
                    received.append(line)
        events = [json.loads(line[5:]) for line in received if line.startswith("data:")]
        assert streamed_text(events) == " ".join(REPLY.split()[:STALL_AFTER_WORDS])

        # The script is used up: ok from now on, a whole reply and the end markers.
        with chat(client, server) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        assert streamed_text(events) == REPLY
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
        assert server.behaviours() == ["drop_mid_stream", "error_first", "stall", "ok"]
        assert server.requests[-1][1]["stream"] is True


async def generate(engine: OpenAIEngine) -> tuple[str, str]:
    text, finish = "", ""
    async for delta in engine.stream(MESSAGES, max_tokens=40, temperature=0.0):
        text += delta.text
        finish = delta.finish_reason or finish
    return text, finish


async def test_flaky_server_through_the_openai_engine():
    with FlakyLlmServer(script=["drop_mid_stream", "error_first", "stall"], stall_seconds=30) as server:
        engine = OpenAIEngine(server.url, server.model, timeout=1.0)
        try:
            with pytest.raises(LlmUnavailable, match="unreachable"):  # the dropped connection
                await generate(engine)
            with pytest.raises(LlmUnavailable, match="HTTP 500"):
                await generate(engine)
            started = time.monotonic()
            with pytest.raises(LlmUnavailable, match="ReadTimeout"):  # the engine's timeout ends a stall
                await generate(engine)
            assert time.monotonic() - started < 5
            assert await generate(engine) == (REPLY, "stop")
        finally:
            await engine.aclose()
        assert server.requests[0][1]["model"] == server.model
        assert server.session_keys == [None] * 4  # no session, no header


async def test_the_openai_engine_names_the_session_for_a_session_affine_router():
    with FlakyLlmServer() as server:
        engine = OpenAIEngine(server.url, server.model, session_header="x-user-id")
        try:
            for session in ("call-1", "call-2", "call-1"):
                async for _ in engine.stream([{"role": "user", "content": "Hi"}], 8, 0.0, session_id=session):
                    pass
        finally:
            await engine.aclose()
        assert server.session_keys == ["call-1", "call-2", "call-1"]


# ------------------------------------------------------------ a real stack on top of it


@pytest.fixture(scope="module")
def flaky_llm():
    with FlakyLlmServer() as server:
        yield server


@pytest.fixture(scope="module")
def flaky_stack(flaky_llm, tmp_path_factory):
    """The five services, the LLM stage on the OpenAI engine against the flaky server."""
    env = {"VOICESTACK_LLM_ENGINE": "openai", "VOICESTACK_LLM_URL": flaky_llm.url,
           "VOICESTACK_LLM_MODEL": flaky_llm.model}
    with Stack(ports="free", log_dir=tmp_path_factory.mktemp("flaky-llm-logs"), env=env) as stack:
        stack.start(START_ORDER)
        yield stack


def session_config() -> edge_pb2.SessionConfig:
    return edge_pb2.SessionConfig(
        input_format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=PIPELINE_RATE))


async def ask_two_questions(address: str, speech_dir, before_first, after_first) -> LiveMicrophone:
    """One call, two questions; before_first() and after_first() rescript the LLM around turn 1."""
    first = speak("What is the capital of France?", speech_dir)
    second = speak("Tell me again, what is the capital of France?", speech_dir)

    async def turn_done(script, index, timeout):
        try:
            await script.wait_for(lambda: script.turn_done(index), timeout=timeout)
        except AssertionError:
            raise AssertionError(f"turn {index} did not end within {timeout}s: {call_summary(script)}") from None

    async def speaker(script, send):
        await turn_done(script, 0, 30)
        before_first()
        await send(first)
        await turn_done(script, 1, 60)
        after_first()
        await send(second)
        await turn_done(script, 2, 60)

    script = LiveMicrophone(session_config())
    await script.run(address, speaker)
    return script


def kind_of(event) -> str:
    return event.WhichOneof("kind")


def turn_of(event) -> int | None:
    body = getattr(event, kind_of(event))
    return getattr(body, "turn_index", None)


def call_summary(script: LiveMicrophone) -> str:
    """The call's events, for failure messages: `speech_ended:1 error(llm UNAVAILABLE) ...`."""
    parts = []
    for _, event in script.timeline:
        kind = kind_of(event)
        if kind in ("agent_audio", "transcript", "agent_text", "turn_trace", "turn_metrics"):
            continue
        if kind == "error":
            parts.append(f"error({event.error.stage or 'edge'} {CODE_NAMES.get(event.error.code, event.error.code)}: "
                         f"{event.error.message})")
        else:
            parts.append(f"{kind}:{turn_of(event)}")
    conversation = script.conversation
    if conversation.status.name != "OK":
        parts.append(f"| call ended {conversation.status.name}: {conversation.details}")
    return " ".join(parts)


def event_index(script: LiveMicrophone) -> dict:
    """(kind, turn) -> the position of its first event in the call."""
    index = {}
    for i, (_, event) in enumerate(script.timeline):
        index.setdefault((kind_of(event), turn_of(event)), i)
    return index


def errors_of(script: LiveMicrophone) -> list[int]:
    return [i for i, (_, event) in enumerate(script.timeline) if kind_of(event) == "error"]


def assert_turn_ended_soon(script: LiveMicrophone, turn: int, bound_s: float, summary: str) -> None:
    index = event_index(script)
    assert ("speech_ended", turn) in index, f"question {turn} was not heard: {summary}"
    assert ("agent_turn_ended", turn) in index, f"turn {turn} did not end with AgentTurnEnded: {summary}"
    spoke, ended = index[("speech_ended", turn)], index[("agent_turn_ended", turn)]
    took = script.timeline[ended][0] - script.timeline[spoke][0]
    assert took < bound_s, f"turn {turn} took {took:.1f}s (over {bound_s:.0f}s) to end after the question: {summary}"


def assert_answered(script: LiveMicrophone, turn: int, summary: str) -> None:
    answer = script.conversation.turns.get(turn)
    assert answer is not None and answer.transcript, f"question {turn} was not transcribed: {summary}"
    assert answer.ended and answer.interrupted is None, summary
    # Exactly the reply, once: a replayed request must not repeat the words sent before the drop.
    assert words(answer.reply_text) == words(REPLY), f"reply {turn}: {answer.reply_text!r}: {summary}"
    assert len(answer.audio) > 24000, f"{len(answer.audio)} bytes of agent audio in turn {turn} (< 0.5 s): {summary}"


async def test_a_drop_that_a_retry_fixes_costs_nothing(flaky_stack, flaky_llm, speech_dir):
    """Only the first request drops mid-stream. UNAVAILABLE from the LLM stage means "try
    again elsewhere" (the engine's LlmUnavailable), and the request is seeded, so a replay
    gives the same reply: the turn is answered whole, with no Error."""
    first_request = len(flaky_llm.requests)
    script = await ask_two_questions(
        flaky_stack.processes["edge"].address, speech_dir,
        before_first=lambda: flaky_llm.behave("ok", script=["drop_mid_stream"]),
        after_first=lambda: None)
    summary = call_summary(script)

    behaviours = flaky_llm.behaviours()[first_request:]
    assert behaviours[:2] == ["drop_mid_stream", "ok"], f"the LLM was asked {behaviours}: {summary}"
    assert not errors_of(script), f"a recovered drop is no Error: {summary}"
    assert_turn_ended_soon(script, 1, ANSWERED_TURN_BOUND_S, summary)
    assert_answered(script, 1, summary)
    assert_answered(script, 2, summary)
    assert script.conversation.status.name == "OK", summary


async def test_a_drop_on_every_replica_still_costs_one_turn(flaky_stack, flaky_llm, speech_dir):
    """Every request of the first turn drops: failover to a second replica cannot help."""
    flaky_stack.spawn("llm", name="llm-2")
    try:
        flaky_stack.wait_ready(["llm-2"], timeout=60)
        first_request = len(flaky_llm.requests)
        during_first_turn = []

        def after_first():
            during_first_turn.extend(flaky_llm.behaviours()[first_request:])
            flaky_llm.behave("ok")

        script = await ask_two_questions(
            flaky_stack.processes["edge"].address, speech_dir,
            before_first=lambda: flaky_llm.behave("drop_mid_stream"), after_first=after_first)
    finally:
        flaky_stack.stop("llm-2")

    summary = call_summary(script)
    assert during_first_turn and set(during_first_turn) == {"drop_mid_stream"}, during_first_turn

    # Exactly one Error, the LLM's, UNAVAILABLE (its backend went away: not our bug), and
    # then that turn's AgentTurnEnded, soon.
    errors = errors_of(script)
    assert len(errors) == 1, f"expected exactly one Error in the call: {summary}"
    error = script.timeline[errors[0]][1].error
    assert error.stage == "llm", summary
    assert error.code == UNAVAILABLE, \
        f"the LLM's backend dropped: UNAVAILABLE, not {CODE_NAMES.get(error.code, error.code)}: {summary}"
    index = event_index(script)
    assert_turn_ended_soon(script, 1, FAILED_TURN_BOUND_S, summary)
    assert index[("speech_started", 1)] < errors[0] < index[("agent_turn_ended", 1)], \
        f"the Error is not turn 1's: {summary}"
    # The call goes on: the next question is answered.
    assert_answered(script, 2, summary)
    assert script.conversation.status.name == "OK", summary


# ------------------------------------------------------------ a model server that is not up (#17)


async def test_an_llm_replica_serves_only_while_its_model_server_is_up(tmp_path):
    """vLLM takes minutes to load and may restart: meanwhile its LLM replica stays out of the
    queue group (an open finds no one: UNAVAILABLE) and says NOT_SERVING on gRPC health;
    once /health answers 200 it serves, and it leaves again when the server goes down."""
    import nats

    from voicestack.bus import StageClient
    from voicestack.errors import StageError
    from voicestack.launcher import health_status
    from voicestack.llm import CONTRACT
    from voicestack.v1 import llm_pb2

    question = llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content="Hi")])

    async def ask(client: StageClient) -> str:
        async with await client.open(CONTRACT, question) as stream:
            await stream.end()
            return "".join([response.text_delta async for response in stream])

    async def eventually(predicate, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"not {what} within {timeout:.0f}s"
            await asyncio.sleep(0.2)

    with FlakyLlmServer() as server, Stack(ports="free", log_dir=tmp_path) as stack:
        server.healthy = False  # loading
        env = {"VOICESTACK_LLM_ENGINE": "openai", "VOICESTACK_LLM_URL": server.url, "VOICESTACK_LLM_MODEL": server.model}
        stack.start_nats()
        llm = stack.spawn("llm", env=env)
        await eventually(lambda: health_status(llm.address) == "NOT_SERVING", "started and NOT_SERVING")
        nc = await nats.connect(stack.nats_url, **stack.nats_options("edge"))
        client = StageClient(nc)
        await client.start()
        try:
            with pytest.raises(StageError) as refused:
                await ask(client)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
            assert not server.requests, "a request reached a server that was not up"

            server.healthy = True
            await eventually(lambda: health_status(llm.address) == "SERVING", "SERVING once /health answers 200")
            assert words(await ask(client)) == words(REPLY)

            server.healthy = False  # a restart
            await eventually(lambda: health_status(llm.address) == "NOT_SERVING", "NOT_SERVING once /health fails")
            with pytest.raises(StageError) as refused:
                await ask(client)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
            assert len(server.requests) == 1
        finally:
            await client.close()
            await nc.close()
