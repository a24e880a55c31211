"""LLM engines against real models: the embedded SmolLM2 in process, and the same model
behind llama-cpp-python's OpenAI-compatible server (standing in for vLLM).

What matters most beyond "it answers" is cancellation: barge-in closes the stream, and
the model must stop generating at once rather than finish a reply nobody will hear.
"""

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
import pytest_asyncio

from voicestack import models
from voicestack.llm.engine import Delta, LlamaCppEngine, LlmUnavailable, OpenAIEngine

pytestmark = pytest.mark.asyncio(loop_scope="session")

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
