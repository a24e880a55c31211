"""One edge Session on fake stages, driven like a call: audio frames in, VAD decisions
when the test says, and every event the client would receive, recorded."""

from __future__ import annotations

import asyncio
import contextlib

from fake_stages import FakeStages
from voicestack.config import Settings
from voicestack.edge.processing import ProcessorChain
from voicestack.edge.server import wants_tools
from voicestack.edge.session import Session
from voicestack.edge.tools import ServerTools, SessionTools
from voicestack.v1 import edge_pb2, vad_pb2

FRAME = b"\0\0" * 320  # 20 ms at 16 kHz
SPEECH_STARTED = vad_pb2.VAD_EVENT_TYPE_SPEECH_STARTED
SPEECH_ENDED = vad_pb2.VAD_EVENT_TYPE_SPEECH_ENDED
SPEECH_PAUSED = vad_pb2.VAD_EVENT_TYPE_SPEECH_PAUSED
SPEECH_RESUMED = vad_pb2.VAD_EVENT_TYPE_SPEECH_RESUMED


def fast_settings(**overrides) -> Settings:
    # Backchannels interrupt like any speech here: the barge-in tests script no interim
    # transcripts (test_backchannels.py tests ignoring them).
    values = dict(disclosure=False, stage_stall_seconds=0.3, audio_lead_ms=300, speculation=False,
                  ignore_backchannels=False)
    values.update(overrides)
    return Settings(**values)


class Call:
    def __init__(self, settings: Settings | None = None, config: edge_pb2.SessionConfig | None = None,
                 server_tools=None, processors=(), recording_store=None):
        self.settings = settings or fast_settings()
        self.config = config or edge_pb2.SessionConfig()
        self.stages = FakeStages()
        self.events: list[edge_pb2.ConverseResponse] = []
        self.status = None  # the call's failure, if it ended with one
        self.session: Session | None = None
        self.server_tools = server_tools  # an edge.tools.ServerTools (HTTP/MCP), if the test has one
        self.processors = ProcessorChain(list(processors))
        self.recording_store = recording_store
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "Call":
        tools = None
        if wants_tools(self.config):
            tools = SessionTools.from_config(self.config.tools, self.server_tools or await ServerTools.start(self.settings))
        self.session = Session("fake-session", self.stages, self.config, self.settings, tools=tools,
                               processors=self.processors, recording_store=self.recording_store)
        await self.session.__aenter__()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.__aexit__(*exc)
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        while (event := await self.session.output.next()) is not None:
            self.events.append(event)
        self.status = self.session.output.failure

    # ------------------------------------------------------------ driving

    async def settle(self, rounds: int = 30) -> None:
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def audio(self, ms: int = 20) -> None:
        for _ in range(max(1, ms // 20)):
            await self.session.on_audio(FRAME)
        await self.settle()

    def vad(self, kind: int, offset_ms: int | None = None) -> None:
        at = self.session.recognition.audio_ms if offset_ms is None else offset_ms
        self.stages.vad.vad_event(kind, at)

    async def say(self, ms: int = 400, transcript: str | None = None) -> None:
        """Speech of `ms`, then its end (and `transcript` as what the STT hears)."""
        if transcript is not None:
            self.stages.transcripts.append(transcript)
        self.vad(SPEECH_STARTED)
        await self.audio(ms)
        self.vad(SPEECH_ENDED)
        await self.audio(20)

    async def wait(self, predicate, seconds: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while not predicate():
            assert loop.time() < end, f"timed out; events: {[e.WhichOneof('kind') for e in self.events]}"
            await asyncio.sleep(0.002)

    async def hang_up(self) -> None:
        self.session.finish_input()
        await self.wait(lambda: self.session.output.closed and self._reader.done())

    # ------------------------------------------------------------ reading

    def of(self, kind: str) -> list:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("kind") == kind]

    def ended(self, index: int) -> bool:
        return any(e.turn_index == index for e in self.of("agent_turn_ended")) or \
            any(e.turn_index == index for e in self.of("interrupted"))

    def reply_text(self, index: int) -> str:
        return next((e.text for e in self.of("agent_turn_ended") if e.turn_index == index), "")

    def audio_of(self, index: int) -> int:
        return sum(len(e.audio.pcm) for e in self.of("agent_audio") if e.turn_index == index)
