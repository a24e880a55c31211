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

Tools: messages and tools are OpenAI-format dicts (the stage builds them). Given `tools`, an
engine may end its reply with calls instead of (or after) text: the last Delta has
finish_reason "tool_calls" and the calls, each whole. vLLM parses calls out of the model's own
format (the chart's --tool-call-parser); the embedded SmolLM2 has no such format, so
LlamaCppEngine decides by scoring (see `LlamaCppEngine._choose_tool`) and writes the arguments
under a grammar made from the tool's JSON schema.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Protocol

import grpc
import httpx

from voicestack import models
from voicestack.config import Settings
from voicestack.errors import ServiceError, invalid

log = logging.getLogger(__name__)

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
# A tool call's tokens beyond its name and arguments (id, type and braces in the OpenAI format
# a vLLM template renders), and a tool result's beyond
# its content (its call id; "Answer the question with this result:"). A few tokens, with room to spare.
TOOL_CALL_TOKENS = 12
# What a vLLM chat template wraps the tools' JSON in (Qwen2.5's, the chart's default model,
# spends about 90 tokens of instructions on it).
TOOLS_TEMPLATE_TOKENS = 100

# LlamaCppEngine with tools: the reply is scored as continuations of this sentence, one per
# tool (its description's first clause, `tool_phrase`) and NO_TOOL_PHRASES for a text answer
# (small talk, and questions the model answers itself). A tool is called only when its score
# beats the best of those by TOOL_MARGIN (nats): a wrong call acts, a wrong text answer only
# talks. Chosen on load/tool_choice.py's first request set; its held-out set says how well
# that carries over (BENCHMARKS.md).
DECISION_PREFIX = "The caller wants to"
NO_TOOL_PHRASES = ("chat", "ask a question")
TOOL_MARGIN = 2.0
PHRASE_MAX_TOKENS = 16  # a longer description is cut here (each token is one evaluation)
ARGUMENTS_MAX_TOKENS = 128  # a call's arguments object; cut short, the reply is text instead
# A string argument without a bound of its own ends here: SmolLM2 sometimes writes on inside a
# string until the tokens run out (seen with end_call's "reason"), which cost the whole call.
# What a spoken request hands a tool (a city, a time, a reason) is shorter.
ARGUMENT_STRING_MAX_CHARS = 64
PRIORS_KEPT = 32  # tool sets whose calibration is kept


@dataclass
class Fitted:
    """A request's messages as sent: the oldest turns dropped to fit the model's context."""

    messages: list[dict]
    dropped: int = 0  # messages left out
    prompt_tokens: int = 0  # estimated, template included (0: the context is not known)
    n_ctx: int = 0  # the context it was fitted to (0: not known, nothing dropped)


def message_tokens(message: dict, count_tokens: Callable[[str], int]) -> int:
    """A message's tokens in the prompt: its content, its tool calls, the template's wrapping."""
    tokens = count_tokens(message["content"]) + MESSAGE_TOKENS
    for call in message.get("tool_calls") or ():
        tokens += count_tokens(call["function"]["name"]) + count_tokens(call["function"]["arguments"])
        tokens += TOOL_CALL_TOKENS
    if message["role"] == "tool":
        tokens += TOOL_CALL_TOKENS
    return tokens


def trim_history(messages: list[dict], count_tokens: Callable[[str], int], n_ctx: int, max_tokens: int,
                 cuts_per_room: int = 0, tools_tokens: int = 0) -> Fitted:
    """Drop the oldest turns until the prompt and the reply fit the context.

    Pure: `count_tokens(text)` is the model's token count of a text; each message costs
    `message_tokens` (its content, its tool calls, MESSAGE_TOKENS), the prompt TEMPLATE_TOKENS
    (the chat template) and `tools_tokens` (the tools, as the engine puts them in the prompt).
    Fits when prompt tokens + max_tokens <= n_ctx.

    Kept always: the leading system message(s) and the last user message (with anything
    after it). Between them the history is cut into turns, each a user message and what
    follows it up to the next user message (the assistant's reply); anything before the first
    such user message is a turn of its own. An assistant's tool calls and the tool results that
    answer them come after the user message of their turn, so they go or stay together. The
    oldest turns go first, whole, and the newest
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
        return message_tokens(message, count_tokens)

    # The tools stay in every prompt, like the system prompt: counted with it.
    system = sum(cost(m) for m in messages[:head]) + tools_tokens
    question = sum(cost(m) for m in messages[tail:])
    budget = n_ctx - max_tokens - TEMPLATE_TOKENS
    if system + question > budget:
        if max_tokens + TEMPLATE_TOKENS >= n_ctx:
            raise invalid(f"max_tokens {max_tokens} leaves no room for a prompt in the model's context "
                          f"of {n_ctx} tokens: lower max_tokens")
        if system < question:
            shorten = "question"
        elif tools_tokens > system - tools_tokens:
            shorten = "tools' descriptions and parameters (or send fewer tools)"
        else:
            shorten = "system prompt"
        asked = "the system prompt, the tools" if tools_tokens else "the system prompt"
        raise invalid(f"{asked} and the question are {system + question + TEMPLATE_TOKENS} tokens; "
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


def new_call_id() -> str:
    """An id for a call the model made, when the model server gave none (llama.cpp in process)."""
    return "call_" + secrets.token_hex(8)


def tool_phrase(tool: dict) -> str:
    """A tool as LlamaCppEngine's decision names it: its description's first clause as a verb
    phrase ("Get the current weather in a city. Use ..." -> "get the current weather in a
    city"), or its name in words ("get_weather" -> "get weather") when it has no description."""
    function = tool["function"]
    phrase = re.split(r"[.;:(\n]", function.get("description") or "", maxsplit=1)[0].strip()
    if not phrase:
        phrase = re.sub(r"[_-]+", " ", function["name"]).strip()
    if phrase[1:2].islower():  # "Get" -> "get", but "URL" stays
        phrase = phrase[0].lower() + phrase[1:]
    return phrase


def render_tool_turns(messages: list[dict]) -> list[dict]:
    """Tool calls and results as plain chat messages, for a model with no tool format of its own.

    An assistant's calls are left out (its words before them stay) and a result becomes a
    system message after the question, "Answer the question with this result: 14:32". Of
    the renderings tried with SmolLM2-135M on eight spoken requests and their results, this
    one's answers used the result most often (7 of 8; "The tool get_time returned: ..." after
    "(I called get_time ...)", 5 of 8, and it was parroted: "The tool gets_time returned").
    A history without tools comes back equal.
    """
    rendered = []
    for message in messages:
        if message["role"] == "tool":
            rendered.append({"role": "system", "content": f"Answer the question with this result: {message['content']}"})
        elif message.get("tool_calls"):
            if message["content"]:
                rendered.append({"role": message["role"], "content": message["content"]})
        else:
            rendered.append({"role": message["role"], "content": message["content"]})
    return rendered


@functools.lru_cache(maxsize=64)
def _arguments_grammar(schema_json: str):
    """llama.cpp grammar for an arguments object fitting this JSON schema; for a schema its
    converter cannot take, any JSON object."""
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(schema_json)
    except Exception as exc:  # the converter raises plain Exceptions for what it does not support
        log.warning("tools: no grammar for the schema %s (%s); any JSON object will do", schema_json[:200], exc)
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    # The converter lets raw control characters (a newline) into strings, which JSON forbids:
    # SmolLM2 wrote them, and json.loads refused the call. Only escaped ones, as in JSON_GBNF.
    gbnf = gbnf.replace(r'char ::= [^"\\] |', r'char ::= [^"\\\x7F\x00-\x1F] |')
    return LlamaGrammar.from_string(gbnf, verbose=False)


def _bounded_strings(schema):
    """A copy of the JSON schema where each string without a bound or a fixed form gets
    maxLength ARGUMENT_STRING_MAX_CHARS."""
    if isinstance(schema, list):
        return [_bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {k: _bounded_strings(v) if k != "enum" and k != "const" else v for k, v in schema.items()}
    if schema.get("type") == "string" and not {"maxLength", "enum", "const", "pattern", "format"} & schema.keys():
        bounded["maxLength"] = ARGUMENT_STRING_MAX_CHARS
    return bounded


def _log_softmax(logits):
    import numpy as np

    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class LlmUnavailable(ServiceError):
    """The model server could not be reached, refused the request or dropped the stream.

    UNAVAILABLE, not INTERNAL: the edge takes it as "try another replica" and fails over.
    """

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


@dataclass
class Delta:
    text: str  # text added
    finish_reason: str = ""  # set on the last delta: "stop" | "length" | "tool_calls"
    completion_tokens: int = 0  # running count (on the last delta: total)
    prompt_tokens: int = 0
    # On the last delta (finish_reason "tool_calls"): the calls, each whole, as
    # {"id", "name", "arguments"} with arguments a JSON object's text.
    tool_calls: list[dict] = field(default_factory=list)


class _Stopped(Exception):
    """The stream's consumer is gone: raised out of llama.cpp's evaluation to abandon it."""


class LlmEngine(Protocol):
    model_name: str

    def stream(self, messages: list[dict], max_tokens: int, temperature: float,
               tools: list[dict] | None = None, session_id: str = "") -> AsyncIterator[Delta]:
        """Yield text deltas; the last one has finish_reason and the token totals (its text may be
        empty), and with `tools` (OpenAI tool dicts) maybe tool_calls. `session_id` names the
        conversation (a router in front of the model servers may keep it on one of them)."""
        ...

    async def fit(self, messages: list[dict], max_tokens: int, tools: list[dict] | None = None) -> Fitted:
        """`messages` trimmed to the model's context with room for max_tokens and the tools
        (trim_history); unchanged when the context is not known. INVALID_ARGUMENT when no trimming fits."""
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

    parallel = 1  # generations at a time: one, so the stage takes no session by affinity (stage.takes_named)

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
        # Tools: prompts rendered here as create_chat_completion renders them (the GGUF's own
        # chat template), so a decision's prompt and the text reply after it share their KV.
        self._chat_template = self._llm.metadata.get("tokenizer.chat_template")
        self._formatter = None  # made at the first request with tools
        self._priors: OrderedDict[tuple, list[float]] = OrderedDict()  # phrases -> their scores after nothing asked

    def _count_tokens(self, text: str) -> int:
        # Read-only use of the vocabulary: safe beside a generation on the worker thread.
        return len(self._llm.tokenize(text.encode(), add_bos=False, special=False))

    def tools_tokens(self, tools: list[dict] | None) -> int:
        """What tools add to a prompt here: not their JSON but the decision's sentence and
        longest phrase, or a call's head (the longest name) and its arguments."""
        if not tools:
            return 0
        phrases = max(min(self.count_tokens(" " + tool_phrase(t)), PHRASE_MAX_TOKENS) for t in tools)
        names = max(self.count_tokens(t["function"]["name"]) for t in tools)
        return self.count_tokens(DECISION_PREFIX) + max(phrases, names + TOOL_CALL_TOKENS)

    async def fit(self, messages: list[dict], max_tokens: int, tools: list[dict] | None = None) -> Fitted:
        # In a thread: a long history's first tokenization must not hold up the event loop
        # (and with it this replica's heartbeats).
        return await asyncio.to_thread(trim_history, messages, self.count_tokens, self.n_ctx, max_tokens,
                                       CUTS_PER_ROOM, self.tools_tokens(tools))

    async def stream(self, messages: list[dict], max_tokens: int, temperature: float,
                     tools: list[dict] | None = None, session_id: str = "") -> AsyncIterator[Delta]:
        if tools and not self._chat_template:
            raise invalid(f"{self.model_name} has no chat template in its GGUF, which tools need here: "
                          "send no tools, or use a model that has one")
        if tools and messages[-1]["role"] == "tool":
            # A tool's result is in: answer with it. Scoring again would mostly pick the same
            # tool (its result makes that phrase likelier still), and a 135M model has no use for
            # a chain of calls.
            tools = None
        # Calls and results become text SmolLM2 can read (an identity for a plain history).
        messages = render_tool_turns(messages)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # loop closed: nobody is listening any more
                stop.set()

        self._stops.add(stop)
        job = self._worker.submit(self._generate, messages, max_tokens, temperature, tools, stop, put)
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

    def _generate(self, messages, max_tokens, temperature, tools, stop: threading.Event, put: Callable) -> None:
        if stop.is_set():
            return
        self._running_stop = stop
        try:
            if tools and (call := self._call(messages, tools, max_tokens)) is not None:
                put(call)
                return
            self._stream_text(messages, max_tokens, temperature, stop, put)
        except _Stopped:
            pass  # nobody is waiting for this reply any more
        except Exception as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            put(None)

    def _stream_text(self, messages, max_tokens, temperature, stop: threading.Event, put: Callable) -> None:
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
        finally:
            if chunks is not None:
                chunks.close()

    # ------------------------------------------------------------------ tools (worker thread)

    def _call(self, messages: list[dict], tools: list[dict], max_tokens: int) -> Delta | None:
        """The reply as one tool call (a last Delta), or None to answer in text."""
        started = time.perf_counter()
        prompt = self._prompt(messages)
        tool = self._choose_tool(prompt, tools)
        decided = time.perf_counter()
        if tool is None:
            log.debug("tools: answering in text (decided in %.3f s)", decided - started)
            return None
        function = tool["function"]
        head = '{"name": ' + json.dumps(function["name"]) + ', "arguments": '
        arguments = self._arguments(prompt + head, function.get("parameters") or {}, max_tokens)
        if arguments is None:
            log.warning("tools: the arguments of %s did not end within %d tokens; answering in text instead",
                        function["name"], min(max_tokens, ARGUMENTS_MAX_TOKENS))
            return None
        log.debug("tools: calling %s (decided in %.3f s, arguments in %.3f s)", function["name"],
                  decided - started, time.perf_counter() - decided)
        call = {"id": new_call_id(), "name": function["name"], "arguments": arguments}
        return Delta("", "tool_calls", self.count_tokens(head + arguments + "}"), len(self._tokenize(prompt)),
                     tool_calls=[call])

    def _choose_tool(self, prompt: str, tools: list[dict]) -> dict | None:
        """The tool the reply should call, or None to answer in text.

        SmolLM2-135M follows no instruction to call tools, and told to name one it names by
        position, whatever was asked (measured: 3-4 of 14 requests right). It does continue a
        sentence sensibly, so each choice is scored as a continuation of the reply "The caller
        wants to": a tool's `tool_phrase` ("get the current weather in a city"), or one of
        NO_TOOL_PHRASES for a text answer. A phrase's score is the sum of its tokens'
        log-probabilities less the same sum after an empty request (its prior, kept per tool
        set): without that, the phrase the model likes best wins whatever was asked. Measured
        in BENCHMARKS.md (load/tool_choice.py). Cost: the prompt (shared with the text reply,
        whose KV it leaves) and one short batch per phrase: ~90-150 ms on 2 cores.
        """
        phrases = [tool_phrase(tool) for tool in tools] + list(NO_TOOL_PHRASES)
        prior = self._prior(tuple(phrases))
        scores = self._phrase_logprobs(prompt + DECISION_PREFIX, phrases)
        calibrated = [score - before for score, before in zip(scores, prior)]
        best = max(range(len(tools)), key=calibrated.__getitem__)
        return tools[best] if calibrated[best] > max(calibrated[len(tools):]) + TOOL_MARGIN else None

    def _prior(self, phrases: tuple) -> list[float]:
        if phrases in self._priors:
            self._priors.move_to_end(phrases)
            return self._priors[phrases]
        nothing_asked = self._prompt([{"role": "user", "content": ""}]) + DECISION_PREFIX
        self._priors[phrases] = prior = self._phrase_logprobs(nothing_asked, list(phrases))
        if len(self._priors) > PRIORS_KEPT:
            self._priors.popitem(last=False)
        return prior

    def _phrase_logprobs(self, context: str, phrases: list[str]) -> list[float]:
        """Each phrase's log-probability as the continuation of `context` (a space between).

        One evaluation per phrase, of the tokens it does not share with the one before
        ("get the current time", "get the current weather": "weather" alone), keeping every
        token's logits.
        """
        from llama_cpp import Llama

        llm = self._llm
        self._evaluate(self._tokenize(context))
        start = llm.n_tokens
        logprobs = {(): _log_softmax(self._last_logits())}  # path after the context -> next token's
        in_kv: list[int] = []  # the path after the context that the KV holds
        totals = []
        for phrase in phrases:
            tokens = llm.tokenize((" " + phrase).encode(), add_bos=False, special=False)[:PHRASE_MAX_TOKENS]
            # The last token's logits are never needed: evaluate up to the one before.
            shared = Llama.longest_token_prefix(in_kv, tokens[:-1])
            if shared < len(tokens) - 1:
                llm.n_tokens = start + shared
                rows = self._eval_keeping_logits(tokens[shared:-1])
                for i, row in enumerate(rows, shared + 1):
                    logprobs[tuple(tokens[:i])] = _log_softmax(row)
                in_kv = tokens[:-1]
            totals.append(sum(float(logprobs[tuple(tokens[:i])][token]) for i, token in enumerate(tokens)))
        return totals

    def _eval_keeping_logits(self, tokens: list[int]):
        """Llama.eval of a few tokens (fewer than n_batch) as one batch, returning every token's
        logits. Llama.eval keeps them only for a model loaded with logits_all, which costs a
        scores array of context x vocabulary (400 MB for SmolLM2's 2048 tokens)."""
        import numpy as np

        if self._running_stop.is_set():
            raise _Stopped
        llm = self._llm
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        llm._batch.set_batch(batch=tokens, n_past=llm.n_tokens, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.input_ids[llm.n_tokens: llm.n_tokens + len(tokens)] = tokens
        llm.n_tokens += len(tokens)
        n_vocab = llm.n_vocab()
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(tokens) * n_vocab,)).reshape(
            len(tokens), n_vocab).copy()

    def _arguments(self, prompt: str, schema: dict, max_tokens: int) -> str | None:
        """The call's arguments object, written under a grammar from the tool's JSON schema;
        None when it did not end within the tokens allowed."""
        if not schema.get("properties"):
            return "{}"  # nothing to write: no evaluation
        llm = self._llm
        # No RAM-cache save of this one-off prompt: a state holds ~200 KB a token (logits).
        cache, llm.cache = llm.cache, None
        try:
            out = llm.create_completion(
                self._tokenize(prompt), max_tokens=min(max_tokens, ARGUMENTS_MAX_TOKENS), temperature=0.0,
                seed=SEED, grammar=_arguments_grammar(json.dumps(_bounded_strings(schema), sort_keys=True)),
            )
        finally:
            llm.cache = cache
        self.tokens_generated += out["usage"]["completion_tokens"]
        try:
            arguments = json.loads(out["choices"][0]["text"])
        except ValueError:
            return None
        return json.dumps(arguments) if isinstance(arguments, dict) else None

    def _prompt(self, messages: list[dict]) -> str:
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            llm = self._llm
            self._formatter = Jinja2ChatFormatter(self._chat_template, llm._model.token_get_text(llm.token_eos()),
                                                  llm._model.token_get_text(llm.token_bos()))
        return self._formatter(messages=messages).prompt

    def _tokenize(self, prompt: str) -> list[int]:
        # As create_chat_completion does with a template's prompt: special tokens parsed, no BOS added.
        return self._llm.tokenize(prompt.encode(), add_bos=False, special=True)

    def _evaluate(self, tokens: list[int]) -> None:
        """Leave `tokens` in the KV cache, evaluating only what differs from what is there (or
        from the RAM cache's closest state), as create_completion does for its prompt."""
        from llama_cpp import Llama

        llm = self._llm
        if llm.cache:
            try:
                state = llm.cache[tokens]
                if (Llama.longest_token_prefix(state.input_ids.tolist(), tokens)
                        > Llama.longest_token_prefix(llm._input_ids.tolist(), tokens)):
                    llm.load_state(state)
            except KeyError:
                pass
        # At least the last token again: its logits are what the caller reads.
        llm.n_tokens = min(Llama.longest_token_prefix(llm._input_ids.tolist(), tokens), len(tokens) - 1)
        llm.eval(tokens[llm.n_tokens:])

    def _last_logits(self):
        import numpy as np

        return np.ctypeslib.as_array(self._llm._ctx.get_logits(), shape=(self._llm.n_vocab(),))

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

    def __init__(self, base_url: str, model: str, api_key: str = "", timeout: float = 30.0,
                 health_url: str | None = None, session_header: str = ""):
        self.model_name = model
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._models_url = base_url.rstrip("/") + "/models"
        # GET 200 while the server can take requests; None: not checked (always ready).
        self.health_url = health_url
        # The header that carries the session id, for a session-affine router in front of
        # several servers (vLLM production-stack's --session-key); "" sends none.
        self.session_header = session_header
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

    async def healthy(self) -> bool:
        """The server answers its health check (vLLM and llama.cpp's server: GET /health,
        200 once the model is loaded, 503 while loading or broken). A server that answers
        without one (404, 401 from a gateway...) is up: only no answer or a 5xx is down.
        Unchecked: always up."""
        if self.health_url is None:
            return True
        try:
            resp = await self._client.get(self.health_url, timeout=min(self._timeout, 2.0))
        except httpx.RequestError:
            return False
        return resp.status_code < 500

    async def fit(self, messages: list[dict], max_tokens: int, tools: list[dict] | None = None) -> Fitted:
        n_ctx = await self.context_length()
        if not n_ctx:
            return Fitted(messages)
        tools_tokens = _approximate_tokens(json.dumps(tools)) + TOOLS_TEMPLATE_TOKENS if tools else 0
        return trim_history(messages, _approximate_tokens, n_ctx, max_tokens, CUTS_PER_ROOM, tools_tokens)

    async def stream(self, messages: list[dict], max_tokens: int, temperature: float,
                     tools: list[dict] | None = None, session_id: str = "") -> AsyncIterator[Delta]:
        body = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": SEED,  # a replayed request (failover) gives the same reply
            "stream": True,
            "stream_options": {"include_usage": True},  # vLLM: exact totals; others ignore it
        }
        if tools:
            # vLLM needs --enable-auto-tool-choice and a --tool-call-parser for "auto" (the chart's
            # llm.vllm.toolCallParser); without them it answers 400, which comes back INVALID_ARGUMENT.
            body["tools"] = tools
            body["tool_choice"] = "auto"
        n = prompt = 0
        finish = ""
        calls: dict[int, dict] = {}  # index -> the call's fragments so far
        try:
            # Leaving this block (aclose, cancel) closes the response: the server sees the
            # disconnect and stops generating.
            headers = {self.session_header: session_id} if self.session_header and session_id else None
            async with self._client.stream("POST", self._url, json=body, headers=headers) as resp:
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
                        delta = choice.get("delta") or {}
                        if text := delta.get("content"):
                            n += 1
                            yield Delta(text, completion_tokens=n, prompt_tokens=prompt)
                        if fragments := delta.get("tool_calls"):
                            n += 1
                            _add_call_fragments(calls, fragments)
                        finish = choice.get("finish_reason") or finish
                    if usage := chunk.get("usage"):  # exact; without it the delta count stands in
                        n, prompt = usage.get("completion_tokens", n), usage.get("prompt_tokens", 0)
        except httpx.RequestError as exc:
            # Refused, reset, dropped mid-stream (RemoteProtocolError), stalled (ReadTimeout),
            # a body that will not decode: all mean "this server, not this request".
            raise LlmUnavailable(f"{self._url} unreachable or dropped the stream: {type(exc).__name__}: {exc}") from exc
        if not finish:
            raise LlmUnavailable(f"{self._url} ended the stream without a finish_reason")
        if calls:
            # Some servers end a reply with calls on "stop": it is "tool_calls" whatever they say.
            yield Delta("", "tool_calls", n, prompt,
                        tool_calls=[self._whole_call(calls[i], finish) for i in sorted(calls)])
            return
        yield Delta("", finish, n, prompt)

    def _whole_call(self, call: dict, finish: str) -> dict:
        """A call's joined fragments, checked: a name, arguments that are a JSON object."""
        if not call["name"]:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"{self._url} sent a tool call without a name: {call}")
        try:
            arguments = json.loads(call["arguments"] or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict) and finish == "length":
            raise invalid(f"the reply ran out of max_tokens inside its call to {call['name']}: raise max_tokens")
        if not isinstance(arguments, dict):
            # The model's own mistake, not the server's: another replica would make it again.
            raise ServiceError(grpc.StatusCode.INTERNAL, f"the model called {call['name']} with arguments that "
                               f"are not a JSON object: {call['arguments'][:200]!r}")
        return {"id": call["id"] or new_call_id(), "name": call["name"], "arguments": json.dumps(arguments)}

    async def aclose(self) -> None:
        await self._client.aclose()


def _add_call_fragments(calls: dict[int, dict], fragments: list) -> None:
    """Streamed tool calls arrive in fragments keyed by index: the first has the id and the
    name, the rest pieces of the arguments' JSON to append (OpenAI, vLLM). A server that repeats
    the id or name in every fragment is taken too."""
    for fragment in fragments:
        if not isinstance(fragment, dict):
            continue
        call = calls.setdefault(fragment.get("index", 0), {"id": "", "name": "", "arguments": ""})
        call["id"] = fragment.get("id") or call["id"]
        function = fragment.get("function") or {}
        if (name := function.get("name")) and name != call["name"]:
            call["name"] += name
        call["arguments"] += function.get("arguments") or ""


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
    at once (tools or not: it never calls one). It measures the edge and the bus, never whether
    a reply makes sense."""

    model_name = "cheap-fixed-reply"

    def __init__(self, reply: str = REPLY):
        self.reply = reply

    async def stream(self, messages: list[dict], max_tokens: int, temperature: float,
                     tools: list[dict] | None = None, session_id: str = "") -> AsyncIterator[Delta]:
        words = self.reply.split(" ")[: max(1, max_tokens)]
        prompt = sum(len(m.get("content", "").split()) for m in messages)
        for n, word in enumerate(words, 1):
            await asyncio.sleep(0)  # a real engine yields to the loop between tokens
            yield Delta(word if n == 1 else " " + word, completion_tokens=n, prompt_tokens=prompt)
        yield Delta("", "stop" if len(words) == len(self.reply.split(" ")) else "length", len(words), prompt)

    async def fit(self, messages: list[dict], max_tokens: int, tools: list[dict] | None = None) -> Fitted:
        return Fitted(messages)  # no context to fit

    async def aclose(self) -> None:
        return None


def health_url(settings: Settings) -> str | None:
    """settings.llm_health_url: "" = the server root of llm_url + /health; "off" = none."""
    if settings.llm_health_url == "off":
        return None
    if settings.llm_health_url:
        return settings.llm_health_url
    root = settings.llm_url.rstrip("/")
    return (root[: -len("/v1")] if root.endswith("/v1") else root) + "/health"


def build_engine(settings: Settings) -> LlmEngine:
    if settings.cheap_engines:
        return FixedLlm()
    if settings.llm_engine == "openai":
        if not settings.llm_url:
            raise SystemExit("llm: --llm-url (VOICESTACK_LLM_URL) is required with --llm-engine openai")
        return OpenAIEngine(settings.llm_url, settings.llm_model or "default", api_key=settings.llm_api_key,
                            health_url=health_url(settings), session_header=settings.llm_session_header)
    if settings.llm_engine == "llamacpp":
        return LlamaCppEngine(settings.llm_model or None, threads=settings.threads, device=settings.device)
    raise SystemExit(f"llm: unknown engine {settings.llm_engine!r}; use llamacpp or openai")
