"""LLM engines against real models: the embedded SmolLM2 in process, and the same model
behind llama-cpp-python's OpenAI-compatible server (standing in for vLLM).

What matters most beyond "it answers" is cancellation: barge-in closes the stream, and
the model must stop generating at once rather than finish a reply nobody will hear.
And a long conversation must keep fitting the model's context: the edge sends the whole
history every turn, the stage drops the oldest turns (trim_history: pure tests first, no
model; then the real tokenizer and a 30-message history through SmolLM2's 2048 tokens).
"""

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import time

import grpc
import httpx
import pytest
import pytest_asyncio
from hypothesis import given, settings, strategies as st

from voicestack import models
from voicestack.config import Settings
from voicestack.errors import ServiceError
from voicestack.llm import server as llm_server
from voicestack.llm.engine import (
    CUTS_PER_ROOM, MESSAGE_TOKENS, TEMPLATE_TOKENS, Delta, FixedLlm, Fitted, LlamaCppEngine, LlmUnavailable,
    OpenAIEngine, trim_history,
)
from voicestack.v1 import llm_pb2

QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
# Runs to max_tokens (checked: 400 in process, 1000 via the server): a stream cut after 3
# deltas had far more to say.
LONG = [{"role": "user", "content": "Write a very long story about a dragon who learns to cook."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def collect(agen) -> list[Delta]:
    return [d async for d in agen]


def check_reply(deltas: list[Delta]) -> None:
    text = "".join(d.text for d in deltas)
    assert text.strip(), deltas
    assert len([d for d in deltas if d.text]) >= 3
    assert deltas[-1].finish_reason in ("stop", "length")
    assert deltas[-1].completion_tokens > 0
    assert all(not d.finish_reason for d in deltas[:-1])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def llama():
    engine = LlamaCppEngine()
    yield engine
    await engine.aclose()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    port = free_port()
    # Logs to a file: the server writes ~200 KB at start, which would fill a pipe and block it.
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    # interrupt_requests off: otherwise a new request would stop an old one by itself and
    # hide whether closing our stream did.
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(models.smollm2_gguf()),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--interrupt_requests", "false"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer /v1/models within 120 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest_asyncio.fixture(loop_scope="session")
async def openai(server_url):
    engine = OpenAIEngine(server_url, "smollm2")
    yield engine
    await engine.aclose()


async def test_llamacpp_answers(llama):
    deltas = await collect(llama.stream(QUESTION, max_tokens=48, temperature=0.0))
    check_reply(deltas)
    assert deltas[-1].prompt_tokens > 10


async def test_llamacpp_aclose_stops_generation(llama):
    before = llama.tokens_generated
    agen = llama.stream(LONG, max_tokens=400, temperature=0.0)
    for _ in range(3):
        assert (await anext(agen)).text
    await agen.aclose()
    stopped_at = llama.tokens_generated
    # A few tokens may have been queued ahead of the consumer; not hundreds.
    assert stopped_at - before < 50
    await asyncio.sleep(0.3)
    assert llama.tokens_generated == stopped_at, "worker kept generating after aclose"

    # The model is free: the next stream runs, and every token since is its own.
    deltas = await collect(llama.stream(QUESTION, max_tokens=16, temperature=0.0))
    assert deltas[0].text
    assert llama.tokens_generated == stopped_at + deltas[-1].completion_tokens


async def test_llamacpp_task_cancel_stops_generation(llama):
    started = asyncio.Event()

    async def consume():
        async for _ in llama.stream(LONG, max_tokens=400, temperature=0.0):
            started.set()

    before = llama.tokens_generated
    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stopped_at = llama.tokens_generated
    assert stopped_at - before < 50
    await asyncio.sleep(0.3)
    assert llama.tokens_generated == stopped_at


def long_prompt(topic: str) -> list[dict]:
    """About 1500 tokens; `topic` comes first, so no earlier prompt is a prefix of it in the KV cache."""
    colours = ("red", "green", "blue", "yellow")
    facts = " ".join(f"In the {topic}, box number {i} is {colours[i % 4]}." for i in range(125))
    return [{"role": "user", "content": f"{topic.title()}. {facts} Which boxes are blue?"}]


async def test_llamacpp_cancel_during_a_long_prompt_frees_the_model(llama):
    # How long evaluating such a prompt takes here, uncancelled (to its first token).
    t0 = time.monotonic()
    async with contextlib.aclosing(llama.stream(long_prompt("harbour"), max_tokens=4, temperature=0.0)) as agen:
        first = await anext(agen)
    prompt_seconds = time.monotonic() - t0
    assert 1300 <= first.prompt_tokens <= 1800, first

    async def consume():
        async for _ in llama.stream(long_prompt("orchard"), max_tokens=4, temperature=0.0):
            pass

    before = llama.tokens_generated
    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)  # inside the prompt's evaluation
    cancelled = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llama.tokens_generated == before  # stopped before its first token
    async with contextlib.aclosing(llama.stream(QUESTION, max_tokens=4, temperature=0.0)) as agen:
        assert (await anext(agen)).text
    waited = time.monotonic() - cancelled
    # Had the prompt's evaluation run on, the model would have been busy ~0.9 of prompt_seconds.
    assert waited < 0.3 * prompt_seconds, (waited, prompt_seconds)


async def test_openai_streams_reply(openai):
    deltas = await collect(openai.stream(QUESTION, max_tokens=48, temperature=0.0))
    check_reply(deltas)


async def test_openai_aclose_frees_server(openai):
    agen = openai.stream(LONG, max_tokens=1000, temperature=0.0)
    for _ in range(3):
        assert (await anext(agen)).text
    await agen.aclose()
    # The server runs one request at a time: had it kept generating the 1000 tokens
    # (25 s here), this one would wait that long for its first delta.
    t0 = time.monotonic()
    agen = openai.stream(QUESTION, max_tokens=16, temperature=0.0)
    assert (await anext(agen)).text
    assert time.monotonic() - t0 < 5.0
    await agen.aclose()


async def test_openai_non_200_is_unavailable(server_url):
    engine = OpenAIEngine(server_url + "/nope", "smollm2")
    with pytest.raises(LlmUnavailable, match="HTTP 404"):
        await collect(engine.stream(QUESTION, max_tokens=8, temperature=0.0))
    await engine.aclose()


async def test_openai_closed_port_is_unavailable():
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = OpenAIEngine(url, "smollm2", timeout=5)
    with pytest.raises(LlmUnavailable, match=re.escape(f"{url}/chat/completions")):
        await collect(engine.stream(QUESTION, max_tokens=8, temperature=0.0))
    await engine.aclose()


# ------------------------------------------------------------ the history fits the context
# trim_history is pure: these tests count a word as a token.


def word_count(text: str) -> int:
    return len(text.split())


def cost(messages: list[dict]) -> int:
    """What trim_history counts for these messages, the chat template's share included."""
    return sum(word_count(m["content"]) + MESSAGE_TOKENS for m in messages) + TEMPLATE_TOKENS


def said(role: str, n: int, tag: str) -> dict:
    return {"role": role, "content": " ".join(f"{tag}w{i}" for i in range(n))}


def conversation(turns: list[tuple[int, int]], system: int = 5, question: int = 5) -> list[dict]:
    """A system prompt, turns of (user words, assistant words), then the question."""
    messages = [said("system", system, "s")]
    for i, (user, assistant) in enumerate(turns):
        messages += [said("user", user, f"u{i}"), said("assistant", assistant, f"a{i}")]
    return messages + [said("user", question, "q")]


def test_trim_keeps_a_history_that_fits():
    messages = conversation([(5, 20)] * 3)
    fitted = trim_history(messages, word_count, n_ctx=1000, max_tokens=80)
    assert fitted == Fitted(messages, dropped=0, prompt_tokens=cost(messages), n_ctx=1000)


def test_trim_drops_the_oldest_turns_whole_and_keeps_the_newest_that_fit():
    messages = conversation([(10, 40)] * 10)  # 62 tokens a turn; system and question 11 each
    fitted = trim_history(messages, word_count, n_ctx=400, max_tokens=80)
    # 400 - 80 - 32 (template) - 22 = 266 for the turns: the newest 4 (248).
    assert fitted.messages == messages[:1] + messages[1 + 12:]
    assert fitted.dropped == 12
    assert fitted.prompt_tokens == cost(fitted.messages) <= 400 - 80
    assert cost(messages[:1] + messages[1 + 10:]) > 400 - 80  # one turn more would not fit


def test_trim_keeps_the_system_prompt_and_the_question_even_alone():
    messages = conversation([(10, 300)] * 3, system=100, question=50)
    fitted = trim_history(messages, word_count, n_ctx=400, max_tokens=80)
    assert fitted.messages == [messages[0], messages[-1]] and fitted.dropped == 6


def test_trim_fails_clearly_when_the_system_prompt_and_question_cannot_fit():
    messages = conversation([(5, 5)], system=2000, question=10)
    with pytest.raises(ServiceError) as err:
        trim_history(messages, word_count, n_ctx=2048, max_tokens=80)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # 2000 + 10 words, 6 a message, 32 for the template
    assert str(err.value) == ("the system prompt and the question are 2054 tokens; the model's context is 2048 "
                              "(max_tokens 80): shorten the system prompt")

    with pytest.raises(ServiceError, match="shorten the question"):
        trim_history(conversation([], system=10, question=3000), word_count, n_ctx=2048, max_tokens=80)
    with pytest.raises(ServiceError, match="max_tokens 2048 leaves no room .* lower max_tokens") as err:
        trim_history(conversation([]), word_count, n_ctx=2048, max_tokens=2048)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_trim_histories_of_other_shapes():
    # No system prompt: every turn can go, the question stays.
    messages = conversation([(50, 50)] * 3)[1:]
    assert trim_history(messages, word_count, n_ctx=210, max_tokens=50).messages == messages[-3:]
    assert trim_history(messages, word_count, n_ctx=200, max_tokens=50).messages == messages[-1:]
    # An assistant message before the first user message (a greeting) is a turn of its own, the oldest.
    messages = [said("system", 5, "s"), said("assistant", 30, "g"), *conversation([(10, 10)])[1:]]
    fitted = trim_history(messages, word_count, n_ctx=cost(messages) + 49, max_tokens=50)
    assert fitted.messages == [messages[0], *messages[2:]] and fitted.dropped == 1
    # Whatever follows the last user message stays with it (an assistant prefix).
    messages = [*conversation([(40, 40)] * 2), said("assistant", 3, "prefix")]
    fitted = trim_history(messages, word_count, n_ctx=150, max_tokens=50)
    assert fitted.messages == [messages[0], *messages[-2:]]
    # Two system messages first: both kept.
    messages = [said("system", 5, "s2"), *conversation([(40, 40)] * 2)]
    assert trim_history(messages, word_count, n_ctx=150, max_tokens=50).messages[:2] == messages[:2]


ROLES = st.sampled_from(["user", "assistant", "system"])


@settings(max_examples=300, deadline=None)
@given(systems=st.integers(0, 2), body=st.lists(st.tuples(ROLES, st.integers(0, 60)), max_size=30),
       n_ctx=st.integers(50, 1500), max_tokens=st.integers(1, 200), cuts=st.sampled_from([0, 1, 2, 4, 1000]))
def test_trim_property(systems, body, n_ctx, max_tokens, cuts):
    messages = [said("system", 8, f"s{i}") for i in range(systems)]
    messages += [said(role, n, f"m{i}") for i, (role, n) in enumerate(body)]
    if not messages:
        messages = [said("user", 3, "q")]
    head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    users = [i for i in range(head, len(messages)) if messages[i]["role"] == "user"]
    tail = users[-1] if users else (len(messages) - 1 if len(messages) > head else len(messages))
    fixed = cost(messages[:head] + messages[tail:])
    if fixed + max_tokens > n_ctx:
        with pytest.raises(ServiceError) as err:
            trim_history(messages, word_count, n_ctx, max_tokens, cuts)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        return
    fitted = trim_history(messages, word_count, n_ctx, max_tokens, cuts)
    first = head + fitted.dropped
    # The system prompt(s), then a suffix of the history that starts a turn and holds the question.
    assert fitted.messages == messages[:head] + messages[first:]
    starts = [i for i in range(head, tail) if i == head or messages[i]["role"] == "user"] + [tail]
    assert first in starts
    assert fitted.prompt_tokens == cost(fitted.messages)
    assert fitted.prompt_tokens + max_tokens <= n_ctx
    # The fewest turns dropped (no cuts), or past that only to the next cut point.
    fits = [j for j in starts if cost(messages[:head] + messages[j:]) + max_tokens <= n_ctx]
    step = (n_ctx - max_tokens - cost(messages[:head])) // cuts if cuts else 0
    if step <= 1:
        assert first == fits[0]
    else:
        overshoot = cost(messages[fits[0]:first]) - TEMPLATE_TOKENS
        turns = [cost(messages[a:b]) - TEMPLATE_TOKENS for a, b in zip(starts, starts[1:])]
        assert overshoot <= step + max(turns, default=0)


def test_trim_with_cut_points_keeps_the_prompt_prefix_for_several_turns():
    """A growing conversation: with cut points the kept history starts at the same message
    for several turns (each prompt extends the last one, so llama.cpp reuses its KV), at the
    cost of fewer old turns kept; turn by turn (no cuts) the prompt changes from its start."""
    sizes = [(8 + i % 5, 25 + (i * 7) % 30) for i in range(40)]

    full = conversation(sizes)

    def run(cuts):
        prompts = []
        for t in range(len(sizes)):
            history = full[: 2 + 2 * t]  # as the edge sends it: the question becomes the next turn's user message
            prompts.append(trim_history(history, word_count, n_ctx=800, max_tokens=80, cuts_per_room=cuts))
        return prompts

    def recomputes(prompts):
        """Turns whose prompt does not extend the previous turn's (its KV must be evaluated again)."""
        return sum(1 for a, b in zip(prompts, prompts[1:]) if b.messages[: len(a.messages)] != a.messages)

    exact, stepped = run(0), run(CUTS_PER_ROOM)  # a step of (800 - 80 - 11 - 32) // 4 = 169 tokens
    assert all(p.prompt_tokens + 80 <= 800 for p in exact + stepped)
    assert exact[-1].dropped > 0
    assert recomputes(exact) >= 20  # every turn from the first trimmed one on
    assert recomputes(stepped) <= recomputes(exact) // 2
    for e, s in zip(exact, stepped):
        # At most the step and one turn (12 + 54 words and two messages) more dropped.
        assert e.dropped <= s.dropped and e.prompt_tokens - s.prompt_tokens <= 169 + 12 + 54 + 2 * MESSAGE_TOKENS


# ------------------------------------------------------------ the stage uses it


class TinyContextLlm(FixedLlm):
    """FixedLlm with a 300-token context (a word a token): what it was asked is kept."""

    def __init__(self):
        super().__init__()
        self.asked = []

    async def fit(self, messages, max_tokens):
        return trim_history(messages, word_count, 300, max_tokens)

    async def stream(self, messages, max_tokens, temperature, session_id=""):
        self.asked.append(messages)
        async for delta in super().stream(messages, max_tokens, temperature):
            yield delta


class SpanAttributes(dict):
    def set_attribute(self, key, value):
        self[key] = value

    def add_event(self, name):
        pass


def generate_request(messages: list[dict], max_tokens: int = 40) -> llm_pb2.GenerateRequest:
    roles = {"system": llm_pb2.CHAT_ROLE_SYSTEM, "user": llm_pb2.CHAT_ROLE_USER,
             "assistant": llm_pb2.CHAT_ROLE_ASSISTANT}
    return llm_pb2.GenerateRequest(max_tokens=max_tokens, messages=[
        llm_pb2.ChatMessage(role=roles[m["role"]], content=m["content"]) for m in messages])


async def test_the_stage_sends_the_trimmed_history_and_says_how_much_it_dropped(monkeypatch, caplog):
    stage = llm_server.LlmStage(Settings(cheap_engines=True))
    stage.engine = engine = TinyContextLlm()
    span = SpanAttributes()
    monkeypatch.setattr(llm_server.trace, "get_current_span", lambda: span)
    messages = conversation([(10, 20)] * 20)

    async def generate(request):
        return [r async for r in stage.stream(llm_server.one_request(request), None)]

    with caplog.at_level("DEBUG", logger=llm_server.__name__):
        replies = await generate(generate_request(messages))
    assert "".join(r.text_delta for r in replies) and replies[-1].finish_reason
    [asked] = engine.asked
    # 300 - 40 - 32 - 22 = 206 for 42-token turns: the newest 4.
    assert asked == messages[:1] + messages[-9:]
    assert span["voicestack.history.dropped"] == 32
    assert "dropped the oldest 32 of 42 messages" in caplog.text

    await generate(generate_request(conversation([(10, 20)])))
    assert span["voicestack.history.dropped"] == 0

    with pytest.raises(ServiceError, match="shorten the system prompt") as err:
        await generate(generate_request(conversation([], system=250)))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(engine.asked) == 2  # never asked


# ------------------------------------------------------------ OpenAIEngine: the server's context


def models_server(*answers):
    """An OpenAIEngine whose HTTP goes to these answers to GET /models, in order (the last repeats)."""
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "GET" and request.url.path == "/v1/models", request.url
        answer = answers[min(len(asked), len(answers) - 1)]
        asked.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    engine = OpenAIEngine("http://vllm.test/v1", "voice-model")
    engine._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return engine, asked


def vllm_models(**card) -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": [
        {"id": "other-model", "object": "model", "max_model_len": 100000},
        {"id": "voice-model", "object": "model", **card}]})


async def test_openai_fits_the_servers_max_model_len_by_an_approximate_count():
    engine, asked = models_server(vllm_models(max_model_len=512))
    messages = conversation([(10, 40)] * 20)  # "u0w1 " and the like: 5 bytes a word, 2 tokens
    fitted = await engine.fit(messages, 80)
    assert fitted.n_ctx == 512 and fitted.dropped > 0
    assert fitted.messages[0] == messages[0] and fitted.messages[-1] == messages[-1]
    assert fitted.prompt_tokens + 80 <= 512
    approximate = sum(-(-len(m["content"].encode()) // 3) + MESSAGE_TOKENS for m in fitted.messages)
    assert fitted.prompt_tokens == approximate + TEMPLATE_TOKENS
    await engine.fit(messages, 80)
    assert len(asked) == 1  # asked once
    await engine.aclose()


async def test_openai_leaves_the_history_when_the_server_does_not_say():
    # llama.cpp's server and others list models without max_model_len: nothing is trimmed.
    engine, asked = models_server(vllm_models())
    messages = conversation([(10, 400)] * 20)
    assert await engine.fit(messages, 80) == Fitted(messages)
    assert await engine.fit(messages, 80) == Fitted(messages)
    assert len(asked) == 1
    await engine.aclose()

    # Not reachable, or a 5xx: nothing trimmed now, asked again next time.
    engine, asked = models_server(httpx.ConnectError("refused"), httpx.Response(503), vllm_models(max_model_len=512))
    assert await engine.fit(messages, 80) == Fitted(messages)
    assert await engine.fit(messages, 80) == Fitted(messages)
    assert (await engine.fit(messages, 80)).dropped > 0
    assert len(asked) == 3
    await engine.aclose()


# ------------------------------------------------------------ the real tokenizer and model


def story_turns(n: int) -> list[dict]:
    """n turns with long answers, about 165 tokens each, all different."""
    messages = []
    for i in range(n):
        messages.append({"role": "user", "content": f"Tell me about the {i + 1}th box in the harbour."})
        messages.append({"role": "assistant", "content": " ".join(
            f"Box {i + 1} holds {k + 3} {('red', 'green', 'blue')[k % 3]} apples from the orchard by the river."
            for k in range(10))})
    return messages


async def test_llamacpp_counts_at_least_the_tokens_the_prompt_has(llama):
    # The estimate (content tokens + the template's share) must not be under the real count.
    for messages in (QUESTION, [*QUESTION[:1], *story_turns(2), QUESTION[1]],
                     [{"role": "user", "content": "Привет! Как дела? Сколько будет два плюс два?"}],
                     [{"role": "system", "content": "你是一个乐于助人的助手。请简短回答。"}, QUESTION[1]]):
        fitted = await llama.fit(messages, 8)
        async with contextlib.aclosing(llama.stream(messages, max_tokens=8, temperature=0.0)) as agen:
            first = await anext(agen)
        assert first.prompt_tokens <= fitted.prompt_tokens <= first.prompt_tokens + 40, (messages, first)


async def test_llamacpp_a_30_message_history_over_the_context_is_answered(llama):
    messages = [QUESTION[0], *story_turns(14), {"role": "user", "content": "How many apples are in box 14?"}]
    assert len(messages) == 30
    assert sum(llama.count_tokens(m["content"]) for m in messages) > llama.n_ctx
    with pytest.raises(ValueError, match="exceed context window"):  # as the edge sends it: too long
        await collect(llama.stream(messages, max_tokens=80, temperature=0.0))
    fitted = await llama.fit(messages, 80)
    assert llama.n_ctx == 2048 and fitted.dropped > 0 and fitted.dropped % 2 == 0
    assert fitted.messages[0] == messages[0] and fitted.messages[-1] == messages[-1]
    deltas = await collect(llama.stream(fitted.messages, max_tokens=80, temperature=0.0))
    check_reply(deltas)
    assert deltas[-1].prompt_tokens + 80 <= 2048
    # Kept: the newest turns up to a cut point, at most a quarter of the room (and a turn) short of full.
    assert deltas[-1].prompt_tokens > 2048 // 2


async def test_llamacpp_a_long_non_latin_system_prompt_is_invalid(llama):
    # Under the edge's 4000-character limit, but some 6000 tokens for SmolLM2's tokenizer.
    system = "你是一个乐于助人的语音助手，请用简短的句子回答用户的问题。" * 130
    assert len(system) < 4000
    says = r"the system prompt and the question are \d+ tokens; the model's context is 2048 \(max_tokens 80\)"
    with pytest.raises(ServiceError, match=says + ": shorten the system prompt") as err:
        await llama.fit([{"role": "system", "content": system}, QUESTION[1]], 80)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
