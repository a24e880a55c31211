"""A scripted live microphone for tests: streams silence at real-time pace and speaks
when the script says, usually after waiting for something the agent did."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from conftest import silence
from voicestack.client import FRAME_MS, Conversation, frames
from voicestack.v1 import edge_pb2, edge_pb2_grpc


class Script:
    """A live microphone whose next words wait for something the agent does."""

    def __init__(self, config: edge_pb2.SessionConfig):
        self.config = config
        self.conversation = Conversation()
        self.first_audio = {}  # turn -> monotonic time of its first agent audio
        self.audio_after_interrupt = 0
        self.timeline = []  # (monotonic time, event) for every event received
        self.changed = asyncio.Event()
        self.finished = False
        self.call_ended = False  # the server ended the call (its status is in conversation)

    async def wait_for(self, predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, "timed out waiting for the agent"
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
