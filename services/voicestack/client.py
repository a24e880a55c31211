"""A Converse client: streams audio like a live microphone and collects what comes
back. `voicestack talk`, the tests and the load generator all use it."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from voicestack.audio import PIPELINE_RATE, float_to_pcm16
from voicestack.v1 import audio_pb2, edge_pb2, edge_pb2_grpc, tools_pb2

FRAME_MS = 20
# Silence streamed after the audio before it counts as all sent: longer than the
# default end-of-turn silence (600 ms), so speech at the very end is heard as ended.
TRAILING_SILENCE_MS = 1000


def edge_channel(address: str, ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.aio.Channel:
    """A channel to the edge, as the gateways open one: TLS with a CA file (mTLS with a
    client cert and key), plaintext without."""
    if not (ca_file or cert_file):
        return grpc.aio.insecure_channel(address)
    read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(read(ca_file), read(key_file),
                                                                          read(cert_file)))


def edge_metadata(api_key: str) -> tuple | None:
    """The call metadata carrying an API key (config.edge_api_key()), or None without one."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


@dataclass
class TurnResult:
    index: int
    transcript: str = ""
    interim: list[str] = field(default_factory=list)
    reply_text: str = ""
    audio: bytearray = field(default_factory=bytearray)
    metrics: edge_pb2.TurnMetrics | None = None
    interrupted: edge_pb2.Interrupted | None = None
    trace: edge_pb2.TurnTrace | None = None
    ended: bool = False


@dataclass
class Conversation:
    session_id: str = ""
    output_rate: int = 24000
    turns: dict[int, TurnResult] = field(default_factory=dict)
    events: list[edge_pb2.ConverseResponse] = field(default_factory=list)
    errors: list[edge_pb2.Error] = field(default_factory=list)
    status: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    no_speech: bool = False  # converse() gave up: all audio sent and no SpeechStarted came
    tool_calls: list[tools_pb2.ToolCall] = field(default_factory=list)
    tool_results: list[edge_pb2.ToolResult] = field(default_factory=list)
    tools_cancelled: list[str] = field(default_factory=list)  # call ids the edge withdrew

    def turn(self, index: int) -> TurnResult:
        return self.turns.setdefault(index, TurnResult(index))

    @property
    def replies(self) -> list[TurnResult]:
        """The user's turns and the agent's answers (turn 0, the agent speaking first, is `opening`)."""
        return [self.turns[i] for i in sorted(self.turns) if i > 0]

    @property
    def opening(self) -> TurnResult | None:
        return self.turns.get(0)

    def record(self, event: edge_pb2.ConverseResponse) -> None:
        self.events.append(event)
        kind = event.WhichOneof("kind")
        body = getattr(event, kind)
        if kind == "session_started":
            self.session_id, self.output_rate = body.session_id, body.output_sample_rate_hz
        elif kind == "transcript":
            turn = self.turn(body.turn_index)
            if body.is_final:
                turn.transcript = body.text
            else:
                turn.interim.append(body.text)
        elif kind == "agent_text":
            self.turn(body.turn_index).reply_text += body.text_delta
        elif kind == "agent_audio":
            self.turn(body.turn_index).audio += body.audio.pcm
        elif kind == "agent_turn_ended":
            self.turn(body.turn_index).ended = True
        elif kind == "turn_metrics":
            self.turn(body.turn_index).metrics = body
        elif kind == "turn_trace":
            self.turn(body.turn_index).trace = body
        elif kind == "interrupted":
            self.turn(body.turn_index).interrupted = body
        elif kind == "error":
            self.errors.append(body)
        elif kind == "tool_call":
            self.tool_calls.append(body)
        elif kind == "tool_call_cancelled":
            self.tools_cancelled.append(body.call_id)


# A client tool's implementation: its arguments in, its result (text or JSON-able) out;
# an exception is reported to the edge as the tool's error.
ToolFunction = Callable[[dict], "str | dict | Awaitable[str | dict]"]


async def run_tool(call: tools_pb2.ToolCall, functions: dict[str, ToolFunction]) -> edge_pb2.ToolResult:
    """Run one ToolCall with the client's own function for it."""
    function = functions.get(call.name)
    if function is None:
        return edge_pb2.ToolResult(call_id=call.id, error=f"this client has no tool {call.name!r}")
    try:
        result = function(json.loads(call.arguments_json or "{}"))
        if inspect.isawaitable(result):
            result = await result
    except Exception as error:  # noqa: BLE001 - the tool's failure is the agent's to handle
        return edge_pb2.ToolResult(call_id=call.id, error=f"{type(error).__name__}: {error}")
    return edge_pb2.ToolResult(call_id=call.id, content=result if isinstance(result, str) else json.dumps(result))


def frames(audio: np.ndarray, frame_ms: int = FRAME_MS) -> list[bytes]:
    """Float audio at 16 kHz as PCM16 frames of frame_ms."""
    step = PIPELINE_RATE * frame_ms // 1000
    # The last frame is padded with silence: the edge refuses frames under 5 ms.
    audio = np.concatenate([audio, np.zeros(-len(audio) % step, dtype=np.float32)])
    pcm = float_to_pcm16(audio)
    return [pcm[i * 2: (i + step) * 2] for i in range(0, len(audio), step)]


def silence(ms: int) -> np.ndarray:
    return np.zeros(PIPELINE_RATE * ms // 1000, dtype=np.float32)


async def converse(
    address: str,
    audio: np.ndarray,
    *,
    config: edge_pb2.SessionConfig | None = None,
    speed: float = 1.0,
    expect_turns: int = 1,
    timeout: float = 60.0,
    metadata=None,
    credentials: grpc.ChannelCredentials | None = None,
    on_event=None,
    no_speech_grace: float | None = None,
    tools: dict[str, ToolFunction] | None = None,
    frame_ms: int = FRAME_MS,
) -> Conversation:
    """Stream `audio` (float32, 16 kHz) at `speed` x real time, then silence like an
    open microphone until `expect_turns` replies have ended (or `timeout`).

    With `no_speech_grace` (seconds): once the audio and TRAILING_SILENCE_MS of silence
    are sent, wait at most that long for a SpeechStarted; if none comes, end the call
    with `no_speech` set (the status stays OK) instead of waiting for the timeout.

    `tools` answers the edge's ToolCall events (declare them in config.tools): each call
    runs in its own task and its ToolResult goes out between audio frames; a call the
    edge withdraws (ToolCallCancelled) is cancelled.
    """
    conversation = Conversation()
    done = asyncio.Event()
    audio_sent = asyncio.Event()
    speech_heard = asyncio.Event()
    config = config or edge_pb2.SessionConfig()
    if not config.input_format.sample_rate_hz:
        config.input_format.sample_rate_hz = PIPELINE_RATE
        config.input_format.encoding = audio_pb2.AUDIO_ENCODING_PCM16
    frame_seconds = frame_ms / 1000 / speed
    answers: asyncio.Queue = asyncio.Queue()  # ToolResults, sent between frames
    running: dict[str, asyncio.Task] = {}

    def take_tool_call(call: tools_pb2.ToolCall) -> None:
        async def answer():
            answers.put_nowait(await run_tool(call, tools or {}))
        running[call.id] = asyncio.create_task(answer())
        running[call.id].add_done_callback(lambda _: running.pop(call.id, None))

    def next_frames():
        while not answers.empty():
            result = answers.get_nowait()
            conversation.tool_results.append(result)
            yield edge_pb2.ConverseRequest(tool_result=result)
    # A session that asks for a longer end-of-turn silence needs more of it after the audio.
    trailing_frames = max(TRAILING_SILENCE_MS, config.endpointing.silence_ms + 400) // frame_ms

    async def requests():
        yield edge_pb2.ConverseRequest(config=config)
        start = time.monotonic()
        sent = 0
        for pcm in frames(audio, frame_ms):
            for answer in next_frames():
                yield answer
            yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=pcm))
            sent += 1
            await asyncio.sleep(max(0.0, start + sent * frame_seconds - time.monotonic()))
        quiet = frames(silence(frame_ms), frame_ms)[0]
        trailing = 0
        while not done.is_set():
            for answer in next_frames():
                yield answer
            yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=quiet))
            sent += 1
            trailing += 1
            if trailing == trailing_frames:
                audio_sent.set()
            await asyncio.sleep(max(0.0, start + sent * frame_seconds - time.monotonic()))

    async def read(call):
        try:
            async for event in call:
                conversation.record(event)
                kind = event.WhichOneof("kind")
                if kind == "speech_started":
                    speech_heard.set()
                elif kind == "tool_call":
                    take_tool_call(event.tool_call)
                elif kind == "tool_call_cancelled" and event.tool_call_cancelled.call_id in running:
                    running[event.tool_call_cancelled.call_id].cancel()
                if on_event:
                    on_event(event)
                ended = [t for t in conversation.replies if t.ended or t.interrupted]
                if len(ended) >= expect_turns:
                    return
        except grpc.aio.AioRpcError as error:
            conversation.status, conversation.details = error.code(), error.details()

    async def give_up_without_speech():
        await audio_sent.wait()
        try:
            await asyncio.wait_for(speech_heard.wait(), no_speech_grace)
        except asyncio.TimeoutError:
            conversation.no_speech = True
            return
        await asyncio.Future()  # speech came: the replies (or the timeout) end the call

    if credentials:
        channel = grpc.aio.secure_channel(address, credentials)
    else:
        channel = grpc.aio.insecure_channel(address)
    async with channel:
        call = edge_pb2_grpc.EdgeServiceStub(channel).Converse(requests(), metadata=metadata, timeout=timeout)
        tasks = [asyncio.create_task(read(call))]
        if no_speech_grace is not None:
            tasks.append(asyncio.create_task(give_up_without_speech()))
        try:
            finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                task.result()  # an on_event callback's exception is the caller's
        finally:
            done.set()
            call.cancel()
            for task in [*tasks, *running.values()]:
                task.cancel()
            await asyncio.gather(*tasks, *running.values(), return_exceptions=True)
    return conversation


def load_tools_file(path: str) -> tuple[edge_pb2.ToolsConfig, dict[str, ToolFunction]]:
    """A `voicestack talk --tools` file: client tools in the OpenAI function format, each
    with how this client runs it: `"command": [argv...]` (the arguments as JSON on its
    stdin, its stdout the result) or `"result": "fixed text"`. Optional top-level keys:
    `end_call` (offer the built-in hang-up), `server_tools` (names), `filler`, `filler_ms`.

        {"tools": [{"type": "function",
                    "function": {"name": "get_time", "description": "The current time",
                                 "parameters": {"type": "object", "properties": {}}},
                    "command": ["date", "+%H:%M"], "timeout_ms": 3000}],
         "end_call": true}
    """
    with open(path) as file:
        spec = json.load(file)
    if isinstance(spec, list):
        spec = {"tools": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("tools", []), list):
        raise ValueError(f"{path}: expected a list of tools or an object with a \"tools\" list")
    config = edge_pb2.ToolsConfig(end_call=bool(spec.get("end_call", False)),
                                  server_tools=list(spec.get("server_tools", [])),
                                  filler=str(spec.get("filler", "")), filler_ms=int(spec.get("filler_ms", 0)))
    functions: dict[str, ToolFunction] = {}
    for i, entry in enumerate(spec.get("tools", [])):
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            raise ValueError(f"{path}: tools[{i}] needs a \"function\" with a \"name\" (the OpenAI function format)")
        name = function["name"]
        config.client_tools.append(edge_pb2.ClientTool(
            definition=tools_pb2.ToolDefinition(name=name, description=function.get("description", ""),
                                                parameters_json=json.dumps(function.get("parameters") or {})),
            timeout_ms=int(entry.get("timeout_ms", 0))))
        if "command" in entry:
            functions[name] = _command_tool(list(entry["command"]), int(entry.get("timeout_ms") or 5000) / 1000)
        elif "result" in entry:
            functions[name] = lambda _arguments, text=str(entry["result"]): text
        else:
            raise ValueError(f"{path}: tools[{i}] ({name}) needs \"command\" or \"result\": how this client runs it")
    return config, functions


def _command_tool(argv: list[str], timeout_s: float) -> ToolFunction:
    async def run(arguments: dict) -> str:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(process.communicate(json.dumps(arguments).encode()), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            process.kill()
            await process.wait()
            raise
        if process.returncode:
            raise RuntimeError(f"{argv[0]} exited {process.returncode}: {err.decode(errors='replace').strip()[:200]}")
        return out.decode(errors="replace").strip()
    return run


class LiveMicrophone:
    """A live microphone for scripts (tests, load/backchannels.py): streams silence at
    real-time pace and speaks when the script says, usually after waiting for something
    the agent did: `await LiveMicrophone(config).run(address, speaker)`."""

    def __init__(self, config: edge_pb2.SessionConfig):
        self.config = config
        self.conversation = Conversation()
        self.first_audio = {}  # turn -> monotonic time of its first agent audio
        self.audio_after_interrupt = 0
        self.timeline = []  # (monotonic time, event) for every event received
        self.changed = asyncio.Event()
        self.finished = False
        self.call_ended = False  # the server ended the call (its status is in conversation)
        self._keys: list[str] = []  # keypad presses to send between frames

    def press(self, digits: str) -> None:
        """Keys on the phone's keypad (a Dtmf request), sent with the next frame."""
        self._keys.append(digits)

    async def wait_for(self, predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for the agent")
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def turn_done(self, index):
        turn = self.conversation.turns.get(index)
        return bool(turn and (turn.ended or turn.interrupted))

    async def run(self, address: str, speaker, timeout: float = 180):
        """`speaker(script, send)` streams audio; silence flows whenever it is not talking."""
        queue: asyncio.Queue = asyncio.Queue()

        async def send(audio: np.ndarray):
            for pcm in frames(audio):
                await queue.put(pcm)
            await queue.join()

        async def requests():
            yield edge_pb2.ConverseRequest(config=self.config)
            quiet = frames(silence(FRAME_MS))[0]
            start, sent = time.monotonic(), 0
            while not self.finished:
                try:
                    pcm = queue.get_nowait()
                    queue.task_done()
                except asyncio.QueueEmpty:
                    pcm = quiet
                yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=pcm))
                while self._keys:
                    yield edge_pb2.ConverseRequest(dtmf=edge_pb2.Dtmf(digits=self._keys.pop(0)))
                sent += 1
                await asyncio.sleep(max(0.0, start + sent * FRAME_MS / 1000 - time.monotonic()))

        async def read(call):
            try:
                async for event in call:
                    self.timeline.append((time.monotonic(), event))
                    self.conversation.record(event)
                    if event.WhichOneof("kind") == "agent_audio":
                        turn = self.conversation.turns[event.agent_audio.turn_index]
                        self.first_audio.setdefault(turn.index, time.monotonic())
                        if turn.interrupted:
                            self.audio_after_interrupt += 1
                    self.changed.set()
            except grpc.aio.AioRpcError as error:
                self.conversation.status, self.conversation.details = error.code(), error.details()
                raise
            finally:
                if not self.finished:
                    self.call_ended = True
                    self.changed.set()

        async with grpc.aio.insecure_channel(address) as channel:
            call = edge_pb2_grpc.EdgeServiceStub(channel).Converse(requests(), timeout=timeout)
            reader = asyncio.create_task(read(call))
            try:
                await speaker(self, send)
                await asyncio.sleep(0.3)  # anything still in flight
            finally:
                self.finished = True
                call.cancel()
                reader.cancel()
                if reader.done() and not reader.cancelled() and reader.exception():
                    raise reader.exception()
        return self.conversation
