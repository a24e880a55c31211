"""Scripted stand-ins for the four stages, in process (no NATS, no models), for the fast
tests of the edge's conversation logic. NEVER evidence that the pipeline works: the real-
process tests are. They speak the opener's API of bus.StageClient (`open(contract, first,
session_id=...)` -> a stream with send/end/cancel, async iteration, `async with`).

  VAD  emits nothing by itself: the test says when speech starts, pauses, ends (`vad_event`)
  STT  on its input's end, the final transcript: the next of `transcripts`, else "hello there";
       an interim when the test says (`interim`)
  LLM  "reply N to <user text>." word by word
  TTS  one clause per text sent (its first chunk carries the text), 10 ms of audio per word

Failures: `fail(stage, point, code)` makes the next stream of `stage` fail at `point`:
"open" (refused), "first" (before its first output), "mid" (after one output), "end"
(instead of its end), "stall" (alive, silent for ever after one output), "after:N" (after N).
"""

from __future__ import annotations

import asyncio
from collections import deque

import grpc

from voicestack.errors import StageError
from voicestack.v1 import audio_pb2, llm_pb2, stt_pb2, tts_pb2, vad_pb2

TTS_RATE = 24000
MS_PER_WORD = 10


class FakeStream:
    def __init__(self, stages: "FakeStages", stage: str, first, failure: tuple | None):
        self.stages, self.stage, self.first = stages, stage, first
        self.failure = failure  # (point, code) or None
        self.replica_id = f"fake-{stage}-{len(stages.opened)}"
        self.inputs: list = []
        self.ended = self.cancelled = self.done = False
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._produced = 0
        self._text = ""
        if stage.startswith("llm"):
            self._write_reply(first)

    # --------------------------------------------------------- opener API

    async def send(self, message) -> None:
        assert not self.ended, f"{self.stage}: send after end"
        self.inputs.append(message)
        if self.stage == "tts" and message.WhichOneof("kind") == "text" and message.text.strip():
            words = message.text.split()
            self._put(tts_pb2.SynthesizeResponse(text=message.text.strip(), audio=audio_pb2.AudioChunk(
                pcm=b"\0\0" * (TTS_RATE * self.stages.ms_per_word // 1000 * len(words)), sample_rate_hz=TTS_RATE)))
        await asyncio.sleep(0)

    async def end(self) -> None:
        self.ended = True
        if self.stage == "stt":
            text = self.stages.transcripts.popleft() if self.stages.transcripts else "hello there"
            language, probability = self.stages.languages.popleft() if self.stages.languages else ("en", 1.0)
            self._put(stt_pb2.TranscribeResponse(text=text, is_final=True, language=language,
                                                 language_probability=probability))
        self._put(None)  # END after what was produced

    async def cancel(self) -> None:
        if self.done:
            return
        self.cancelled = self.done = True
        self._outputs.put_nowait(None)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        if not self.done:
            await self.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        while True:
            if self.cancelled:
                raise StopAsyncIteration
            point, code = self.failure or (None, None)
            after = int(point.split(":")[1]) if point and point.startswith("after:") else None
            if point == "first" and self._produced == 0 or point == "mid" and self._produced == 1 \
                    or after is not None and self._produced == after:
                self._fail(code)
            if point == "stall" and self._produced >= 1:
                await asyncio.Event().wait()  # alive and silent until cancelled
            item = await self._outputs.get()
            if self.cancelled:
                raise StopAsyncIteration
            if isinstance(item, StageError):
                self.done = True
                raise item
            if item is None:
                if point in ("end", "first", "mid"):
                    self._fail(code)
                self.done = True
                raise StopAsyncIteration
            self._produced += 1
            return item

    # --------------------------------------------------------- behaviour

    async def fail_now(self, code: grpc.StatusCode) -> None:
        """The stream fails at once, wherever it is (a replica gone, say)."""
        self._put(StageError(code, f"{self.stage} failed (scripted)", self.stage))
        await asyncio.sleep(0)

    def interim(self, text: str) -> None:
        """(STT) an interim transcript of the utterance so far."""
        self._put(stt_pb2.TranscribeResponse(text=text, is_final=False))

    def vad_event(self, kind: int, offset_ms: int) -> None:
        self._put(vad_pb2.DetectResponse(type=kind, offset_ms=offset_ms))

    def _write_reply(self, request: llm_pb2.GenerateRequest) -> None:
        self.stages.llm_requests.append(request)
        said = [m for m in request.messages if m.role != llm_pb2.CHAT_ROLE_SYSTEM]  # (an instruction may be last)
        user = said[-1].content if said else ""
        self.stages.replies += 1
        if request.tools and self.stages.tool_calls:  # a scripted round of calls
            preamble, calls = self.stages.tool_calls.popleft()
            if preamble:
                self._put(llm_pb2.GenerateResponse(text_delta=preamble, completion_tokens=1))
            self._put(llm_pb2.GenerateResponse(tool_calls=calls, finish_reason="tool_calls", completion_tokens=2))
            self._put(None)
            return
        words = f"reply {self.stages.replies} to {user}.".split()
        for n, word in enumerate(words, 1):
            self._put(llm_pb2.GenerateResponse(text_delta=(" " if n > 1 else "") + word, completion_tokens=n))
        self._put(llm_pb2.GenerateResponse(finish_reason="stop", completion_tokens=len(words)))
        self._put(None)

    def _put(self, item) -> None:
        if not self.done:
            self._outputs.put_nowait(item)

    def _fail(self, code) -> None:
        self.done = True
        raise StageError(code, f"{self.stage} failed (scripted)", self.stage)


class FakeStages:
    def __init__(self) -> None:
        self.opened: list[FakeStream] = []
        self.failures: dict[str, deque] = {s: deque() for s in ("vad", "stt", "llm", "llm-strong", "tts")}
        self.transcripts: deque = deque()
        self.languages: deque = deque()  # (language, probability) of the next finals, else ("en", 1.0)
        self.llm_requests: list[llm_pb2.GenerateRequest] = []
        self.tool_calls: deque = deque()  # (preamble, [ToolCall]): the next LLM round offered tools makes these
        self.replies = 0
        self.asked_replicas: list[tuple[str, str]] = []  # (stage, replica asked for: "" = any) per open
        self.ms_per_word = MS_PER_WORD  # of TTS audio: longer keeps a reply speaking (paced) longer

    def fail(self, stage: str, point: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        self.failures[stage].append((point, code))

    async def open(self, contract, first=None, *, session_id: str = "", replica: str = "") -> FakeStream:
        await asyncio.sleep(0)
        failure = self.failures[contract.name].popleft() if self.failures[contract.name] else None
        if failure and failure[0] == "open":
            raise StageError(failure[1], f"{contract.name} refused the open (scripted)", contract.name)
        stream = FakeStream(self, contract.name, first, failure)
        self.asked_replicas.append((contract.name, replica))
        if replica:  # a replica asked for by name takes it (it has room, here)
            stream.replica_id = replica
        self.opened.append(stream)
        return stream

    @property
    def vad(self) -> FakeStream:
        return [s for s in self.opened if s.stage == "vad" and not s.done][-1]

    @property
    def stt(self) -> FakeStream:
        return [s for s in self.opened if s.stage == "stt" and not s.done][-1]

    def open_streams(self) -> list[FakeStream]:
        return [s for s in self.opened if not s.done]
