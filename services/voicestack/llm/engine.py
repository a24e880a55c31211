"""LLM engines: one narrow async streaming interface, two backends.

The LLM stage talks only to `LlmEngine`, so the embedded CPU model (llama.cpp in this
process) and a production vLLM server (OpenAI-compatible HTTP) are interchangeable.
Both stream text as tokens are produced, and both stop within one token (or one slice of
a long prompt's evaluation) when the consumer closes the stream (`await agen.aclose()`,
or `contextlib.aclosing`) or its task is cancelled: barge-in depends on that, a reply
nobody will hear must not keep a replica busy.

`FixedLlm` is the benchmarks-only stand-in (settings.cheap_engines); `build_engine(settings)`
picks one of the three.

The history the edge sends grows with the call; `fit` (each engine's, around
`trim_history`) keeps a request within the model's context by dropping the oldest turns.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Protocol

import grpc
import httpx

from voicestack import models
from voicestack.config import Settings
from voicestack.errors import ServiceError, invalid


REPEAT_PENALTY = 1.2
SEED = 1234
# llama.cpp evaluates a whole prompt in one call; on CPU it gets slices this long, so that a
# stop lands in between. Measured on 2 cores: 64 tokens take 0.35 s, and 1200 tokens took
# 8.1-8.5 s in slices of 64 against 6.9-9.2 s in llama.cpp's own 512 (noise).
PROMPT_SLICE_TOKENS = 64
REPLY = "The capital of France is Paris, a city on the Seine."  # all FixedLlm ever says


# What the chat template adds to the content's tokens. SmolLM2's ChatML is 5 tokens a message
# ("<|im_start|>", the role, a newline; "<|im_end|>", a newline), 3 to open the reply, and
# about 20 for the default system prompt it inserts when there is none; one spare each.
MESSAGE_TOKENS = 6
TEMPLATE_TOKENS = 32
# Dropped history is cut at turn boundaries that come every quarter of the room the history has
# (the context less max_tokens and the system prompt; counted from the first turn), not one
# turn at a time: the kept history then starts at the same message for several turns (5-8
# voice turns of 60-100 tokens with a short system prompt), so llama.cpp (and vLLM's prefix
# cache) reuse the prompt's KV instead of evaluating the whole context again every turn
# (~1900 tokens: 10+ s on 2 CPU cores). The price: up to a quarter of that room (and one
# turn) holds less old history than it could.
CUTS_PER_ROOM = 4
# OpenAIEngine: no tokenizer here; UTF-8 bytes / 3 is over the count of common BPE tokenizers
# for English (~4 characters a token) and about right for Cyrillic (2 bytes a character) and
# CJK (3 bytes a character, ~1 token).
BYTES_PER_TOKEN = 3


@dataclass
class Fitted:
    """A request's messages as sent: the oldest turns dropped to fit the model's context."""

    messages: list[dict]
    dropped: int = 0  # messages left out
    prompt_tokens: int = 0  # estimated, template included (0: the context is not known)
    n_ctx: int = 0  # the context it was fitted to (0: not known, nothing dropped)


def trim_history(messages: list[dict], count_tokens: Callable[[str], int], n_ctx: int, max_tokens: int,
                 cuts_per_room: int = 0) -> Fitted:
    """Drop the oldest turns until the prompt and the reply fit the context.

    Pure: `count_tokens(text)` is the model's token count of a message's content; each
    message adds MESSAGE_TOKENS and the prompt TEMPLATE_TOKENS (the chat template). Fits
    when prompt tokens + max_tokens <= n_ctx.

    Kept always: the leading system message(s) and the last user message (with anything
    after it). Between them the history is cut into turns, each a user message and what
    follows it up to the next user message (the assistant's reply); anything before the first
    such user message is a turn of its own. The oldest turns go first, whole, and the newest
    that fit stay. With `cuts_per_room` (k), a cut falls only where the tokens dropped so far
    pass a multiple of a step: 1/k of the room the history has (n_ctx - max_tokens - the
    template - the system prompt, the same all through a session), counted from the first turn,
    so the cut point stays put as the history grows and the kept prompt keeps its prefix from
    one turn to the next; up to a step (and a turn) more is dropped than the least that would
    fit. If the system prompt and the last user message alone do not fit, INVALID_ARGUMENT.
    """
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    tail = next((i for i in range(len(messages) - 1, head - 1, -1) if messages[i]["role"] == "user"),
                len(messages) - 1 if len(messages) > head else len(messages))

    def cost(message: dict) -> int:
        return count_tokens(message["content"]) + MESSAGE_TOKENS

    system = sum(cost(m) for m in messages[:head])
    question = sum(cost(m) for m in messages[tail:])
    budget = n_ctx - max_tokens - TEMPLATE_TOKENS
    if system + question > budget:
        if max_tokens + TEMPLATE_TOKENS >= n_ctx:
            raise invalid(f"max_tokens {max_tokens} leaves no room for a prompt in the model's context "
                          f"of {n_ctx} tokens: lower max_tokens")
        shorten = "system prompt" if system >= question else "question"
        raise invalid(f"the system prompt and the question are {system + question + TEMPLATE_TOKENS} tokens; "
                      f"the model's context is {n_ctx} (max_tokens {max_tokens}): shorten the {shorten}")

    step = max(1, (budget - system) // cuts_per_room) if cuts_per_room else 0
    # Turn starts between head and tail, and each one's offset from the first (in tokens).
    starts, offsets, total = [], [], 0
    for i in range(head, tail):
        if i == head or messages[i]["role"] == "user":
            starts.append(i)
            offsets.append(total)
        total += cost(messages[i])
    keep = len(starts)  # index of the first kept turn; len(starts): none kept
    for j in range(len(starts)):
        if system + question + total - offsets[j] > budget:
            continue  # too much still
        if step and j and offsets[j] // step == offsets[j - 1] // step:
            continue  # not a cut point: no multiple of the step passed since the last turn
        keep = j
        break
    first = starts[keep] if keep < len(starts) else tail
    kept_middle = total - (offsets[keep] if keep < len(starts) else total)
    return Fitted(messages[:head] + messages[first:], first - head,
                  system + kept_middle + question + TEMPLATE_TOKENS, n_ctx)


class LlmUnavailable(ServiceError):
    """The model server could not be reached, refused the request or dropped the stream.

    UNAVAILABLE, not INTERNAL: the edge takes it as "try another replica" and fails over.
    """

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


@dataclass
class Delta:
    text: str  # text added
    finish_reason: str = ""  # set on the last delta: "stop" | "length"
    completion_tokens: int = 0  # running count (on the last delta: total)
    prompt_tokens: int = 0


class _Stopped(Exception):
    """The stream's consumer is gone: raised out of llama.cpp's evaluation to abandon it."""


class LlmEngine(Protocol):
    model_name: str

    def stream(self, messages: list[dict], max_tokens: int, temperature: float) -> AsyncIterator[Delta]:
        """Yield text deltas; the last one has finish_reason and the token totals (its text may be empty)."""
        ...

    async def fit(self, messages: list[dict], max_tokens: int) -> Fitted:
        """`messages` trimmed to the model's context with room for max_tokens (trim_history);
        unchanged when the context is not known. INVALID_ARGUMENT when no trimming fits."""
        ...

    async def aclose(self) -> None: ...


class LlamaCppEngine:
    """llama-cpp-python in process.

    A Llama object holds one KV cache, so it runs one generation at a time: streams
    queue on a single worker thread (that thread is the lock). Concurrency comes from
    more replicas, or from OpenAIEngine against vLLM, which batches.

    Prefix reuse: llama.cpp keeps the KV of the last prompt and re-evaluates only what
    differs, so a session's next turn right after its last one starts fast. When other
    sessions' turns came in between, that KV is gone; the RAM cache (prefix_cache_mb,
    0 = off) keeps recent states and restores the one sharing the longest prefix.
    Measured on 2 cores: next turn after another session's turn 0.19 s to first token
    with it, 0.34 s without; right after its own turn 0.07 s either way.
    """

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = 2048,
        threads: int = 0,
        device: str = "cpu",
        prefix_cache_mb: int = 256,
    ):
        from llama_cpp import Llama  # here, so OpenAIEngine works without llama.cpp installed

        path = str(model_path or models.smollm2_gguf())
        self.model_name = Path(path).stem
        self._llm = Llama(
            model_path=path,
            n_ctx=n_ctx,
            # 0: llama-cpp-python's default, half the host's CPUs to generate and all of
            # them for the prompt; it ignores a container's CPU quota, so set it in a pod.
            n_threads=threads or None,
            n_threads_batch=threads or None,
            n_gpu_layers=-1 if device == "cuda" else 0,
            verbose=False,
        )
        if prefix_cache_mb:
            self._llm.set_cache(_ram_cache(prefix_cache_mb << 20))
        # Every evaluation, the prompt's and each sampled token's, goes through
        # _eval_unless_stopped: llama-cpp-python offers no other way into the prompt's.
        # A GPU evaluates a whole batch in milliseconds; smaller slices would only slow it.
        self._eval = self._llm.eval
        self._llm.eval = self._eval_unless_stopped
        self._slice = PROMPT_SLICE_TOKENS if device == "cpu" else self._llm.n_batch
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._stops: set[threading.Event] = set()
        self._running_stop = threading.Event()  # the stop of the stream on the worker now
        self.tokens_generated = 0  # all tokens ever sampled; tests watch it stop on cancel
        self.n_ctx = self._llm.n_ctx()
        # The edge sends the whole history every turn: each message is tokenized once.
        self.count_tokens = functools.lru_cache(maxsize=4096)(self._count_tokens)

    def _count_tokens(self, text: str) -> int:
        # Read-only use of the vocabulary: safe beside a generation on the worker thread.
        return len(self._llm.tokenize(text.encode(), add_bos=False, special=False))

    async def fit(self, messages: list[dict], max_tokens: int) -> Fitted:
        # In a thread: a long history's first tokenization must not hold up the event loop
        # (and with it this replica's heartbeats).
        return await asyncio.to_thread(trim_history, messages, self.count_tokens, self.n_ctx, max_tokens,
                                       CUTS_PER_ROOM)

    async def stream(self, messages: list[dict], max_tokens: int, temperature: float) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # loop closed: nobody is listening any more
                stop.set()

        self._stops.add(stop)
        job = self._worker.submit(self._generate, messages, max_tokens, temperature, stop, put)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            self._stops.discard(stop)
            job.cancel()  # only succeeds while still queued behind another stream
            # Wait for the worker to leave the model, so the next stream (and the
            # tokens_generated counter) sees it idle; at most one token's or prompt slice's time.
            await asyncio.wait([asyncio.wrap_future(job)])

    def _eval_unless_stopped(self, tokens) -> None:
        """Llama.eval a slice at a time, giving up between two once the stream is stopped.

        What was evaluated stays in the KV cache and counts in n_tokens, so the next prompt
        reuses the prefix as usual.
        """
        for start in range(0, len(tokens), self._slice):
            if self._running_stop.is_set():
                raise _Stopped
            self._eval(tokens[start: start + self._slice])

    def _generate(self, messages, max_tokens, temperature, stop: threading.Event, put: Callable) -> None:
        if stop.is_set():
            return
        self._running_stop = stop
        chunks = None
        try:
            chunks = self._llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True,
                # Small models loop without a repeat penalty; a fixed seed makes a
                # replayed request (failover) give the same reply.
                repeat_penalty=REPEAT_PENALTY, seed=SEED,
            )
            n = prompt = 0
            for chunk in chunks:
                if stop.is_set():  # checked per token: breaking here stops sampling
                    break
                choice = chunk["choices"][0]
                if "role" in choice["delta"]:
                    # Sent once the prompt is evaluated and the first token sampled.
                    prompt = self._llm.n_tokens
                    continue
                if choice["finish_reason"]:
                    # No break: the iterator's remaining step saves the prefix cache, if any.
                    put(Delta("", choice["finish_reason"], n, prompt))
                    continue
                # One chunk per sampled token (text may be empty mid-UTF-8 character).
                n += 1
                self.tokens_generated += 1
                if text := choice["delta"].get("content"):
                    put(Delta(text, completion_tokens=n, prompt_tokens=prompt))
        except _Stopped:
            pass  # nobody is waiting for this reply any more
        except Exception as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            if chunks is not None:
                chunks.close()
            put(None)

    async def aclose(self) -> None:
        for stop in list(self._stops):
            stop.set()
        await asyncio.to_thread(self._worker.shutdown, wait=True, cancel_futures=True)
        self._llm.close()


def _ram_cache(capacity_bytes: int):
    from llama_cpp import LlamaRAMCache

    class RamCache(LlamaRAMCache):
        @property
        def cache_size(self) -> int:
            # Upstream counts only the KV bytes, but each saved state also holds a float32
            # logits row per token (~200 KB a token for SmolLM2, 10x its KV): count both,
            # or the default 2 GB "capacity" holds some 20 GB.
            return sum(s.llama_state_size + s.scores.nbytes for s in self.cache_state.values())

    return RamCache(capacity_bytes)


class OpenAIEngine:
    """Any OpenAI-compatible /v1/chat/completions server with streaming (vLLM, llama.cpp).

    base_url includes the API prefix, as in the openai SDK: "http://vllm:8000/v1".
    Concurrency is the server's business (vLLM batches), so streams run in parallel.
    """

    def __init__(self, base_url: str, model: str, api_key: str = "", timeout: float = 30.0):
        self.model_name = model
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._models_url = base_url.rstrip("/") + "/models"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # The timeout also bounds the gap between two streamed chunks: a stalled server fails.
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout)
        self._timeout = timeout
        self.n_ctx: int | None = None  # the server's context (vLLM's max_model_len); 0: it does not say
        self._n_ctx_lock = asyncio.Lock()

    async def context_length(self) -> int:
        """The model's context as GET /models gives it (vLLM: max_model_len), asked once;
        0 when the server does not say (then nothing is trimmed). A server that cannot be
        reached or answers 5xx is asked again next time (the request itself then fails
        UNAVAILABLE, as it would have)."""
        async with self._n_ctx_lock:
            if self.n_ctx is None:
                try:
                    resp = await self._client.get(self._models_url, timeout=min(self._timeout, 5.0))
                except httpx.RequestError:
                    return 0
                if resp.status_code >= 500:
                    return 0  # a passing failure: ask again next time
                self.n_ctx = _max_model_len(resp, self.model_name) if resp.status_code == 200 else 0
            return self.n_ctx

    async def fit(self, messages: list[dict], max_tokens: int) -> Fitted:
        n_ctx = await self.context_length()
        if not n_ctx:
            return Fitted(messages)
        return trim_history(messages, _approximate_tokens, n_ctx, max_tokens, CUTS_PER_ROOM)

    async def stream(self, messages: list[dict], max_tokens: int, temperature: float) -> AsyncIterator[Delta]:
        body = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": SEED,  # a replayed request (failover) gives the same reply
            "stream": True,
            "stream_options": {"include_usage": True},  # vLLM: exact totals; others ignore it
        }
        n = prompt = 0
        finish = ""
        try:
            # Leaving this block (aclose, cancel) closes the response: the server sees the
            # disconnect and stops generating.
            async with self._client.stream("POST", self._url, json=body) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread())[:300].decode(errors="replace")
                    if resp.status_code == 400:  # the request itself (too long for its context, say): no replica helps
                        raise invalid(f"{self._url} refused the request (HTTP 400): {detail}")
                    if resp.status_code == 429:
                        raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                           f"{self._url} is busy (HTTP 429); retry shortly")
                    raise LlmUnavailable(f"{self._url} answered HTTP {resp.status_code}: {detail}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # SSE comments, pings, blank separators
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = _chunk(data)
                    if chunk is None:  # e.g. the last line cut short by a dropped connection
                        raise LlmUnavailable(f"{self._url} sent a malformed chunk: {data[:200]!r}")
                    if "error" in chunk:
                        raise LlmUnavailable(f"{self._url} failed mid-stream: {chunk['error']}")
                    for choice in chunk.get("choices") or []:
                        if text := (choice.get("delta") or {}).get("content"):
                            n += 1
                            yield Delta(text, completion_tokens=n, prompt_tokens=prompt)
                        finish = choice.get("finish_reason") or finish
                    if usage := chunk.get("usage"):  # exact; without it the delta count stands in
                        n, prompt = usage.get("completion_tokens", n), usage.get("prompt_tokens", 0)
        except httpx.RequestError as exc:
            # Refused, reset, dropped mid-stream (RemoteProtocolError), stalled (ReadTimeout),
            # a body that will not decode: all mean "this server, not this request".
            raise LlmUnavailable(f"{self._url} unreachable or dropped the stream: {type(exc).__name__}: {exc}") from exc
        if not finish:
            raise LlmUnavailable(f"{self._url} ended the stream without a finish_reason")
        yield Delta("", finish, n, prompt)

    async def aclose(self) -> None:
        await self._client.aclose()


def _approximate_tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN)


def _max_model_len(resp: httpx.Response, model: str) -> int:
    """vLLM lists `max_model_len` per model; the one named `model`, or the only one listed."""
    try:
        listed = [m for m in resp.json()["data"] if isinstance(m, dict)]
    except (ValueError, KeyError, TypeError):
        return 0
    named = [m for m in listed if m.get("id") == model] or (listed if len(listed) == 1 else [])
    value = named[0].get("max_model_len") if named else None
    return value if isinstance(value, int) and value > 0 else 0


def _chunk(data: str) -> dict | None:
    """One SSE data line as a JSON object; None when it is not one."""
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


class FixedLlm:
    """BENCHMARKS ONLY (cheap_engines): LlmEngine's interface; the same reply, a word per Delta,
    at once. It measures the edge and the bus, never whether a reply makes sense."""

    model_name = "cheap-fixed-reply"

    def __init__(self, reply: str = REPLY):
        self.reply = reply

    async def stream(self, messages: list[dict], max_tokens: int, temperature: float) -> AsyncIterator[Delta]:
        words = self.reply.split(" ")[: max(1, max_tokens)]
        prompt = sum(len(m.get("content", "").split()) for m in messages)
        for n, word in enumerate(words, 1):
            await asyncio.sleep(0)  # a real engine yields to the loop between tokens
            yield Delta(word if n == 1 else " " + word, completion_tokens=n, prompt_tokens=prompt)
        yield Delta("", "stop" if len(words) == len(self.reply.split(" ")) else "length", len(words), prompt)

    async def fit(self, messages: list[dict], max_tokens: int) -> Fitted:
        return Fitted(messages)  # no context to fit

    async def aclose(self) -> None:
        return None


def build_engine(settings: Settings) -> LlmEngine:
    if settings.cheap_engines:
        return FixedLlm()
    if settings.llm_engine == "openai":
        if not settings.llm_url:
            raise SystemExit("llm: --llm-url (VOICESTACK_LLM_URL) is required with --llm-engine openai")
        return OpenAIEngine(settings.llm_url, settings.llm_model or "default", api_key=settings.llm_api_key)
    if settings.llm_engine == "llamacpp":
        return LlamaCppEngine(settings.llm_model or None, threads=settings.threads, device=settings.device)
    raise SystemExit(f"llm: unknown engine {settings.llm_engine!r}; use llamacpp or openai")
