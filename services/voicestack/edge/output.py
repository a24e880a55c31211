"""What goes to the client: events in the order they happened, agent audio in its own
lane beside them, so a barge-in clears the audio not yet sent (`clear_audio`) instead of
filtering everything queued. The Converse writer takes `next()` until it gets None."""

from __future__ import annotations

import asyncio
from collections import deque

import grpc

from voicestack.errors import ServiceError
from voicestack.v1 import edge_pb2

MAX_QUEUED = 2000  # messages: a client this far behind is not reading; end its session


class Output:
    def __init__(self, limit: int = MAX_QUEUED):
        self.limit = limit
        self._events: deque = deque()  # (seq, ConverseResponse)
        self._audio: deque = deque()  # (seq, turn_index, ConverseResponse)
        self._seq = 0
        self._wake = asyncio.Event()
        self.closed = False
        self.failure: ServiceError | None = None  # set when the call ends with a status

    def send(self, **event) -> None:
        """An event for the client (a ConverseResponse field and its message)."""
        self._put(self._events, (edge_pb2.ConverseResponse(**event),))

    def send_audio(self, turn_index: int, audio) -> None:
        self._put(self._audio, (turn_index, edge_pb2.ConverseResponse(
            agent_audio=edge_pb2.AgentAudio(turn_index=turn_index, audio=audio))))

    def _put(self, lane: deque, item: tuple) -> None:
        if self.closed:
            return
        if len(self._events) + len(self._audio) >= self.limit:
            self.close(ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    "client is not reading the stream fast enough; session ended"))
            return
        self._seq += 1
        lane.append((self._seq, *item))
        self._wake.set()

    def clear_audio(self, turn_index: int | None = None) -> int:
        """Drop agent audio not yet handed to gRPC (of one turn, or all); how many chunks."""
        kept = deque(item for item in self._audio if turn_index is not None and item[1] != turn_index)
        dropped = len(self._audio) - len(kept)
        self._audio = kept
        return dropped

    def pending(self) -> list:
        """What is queued, in the order it will be sent."""
        items = sorted([(item[0], item[-1]) for item in (*self._events, *self._audio)], key=lambda item: item[0])
        return [message for _, message in items]

    def close(self, failure: ServiceError | None = None) -> None:
        """No more events; with `failure`, the call ends with that status and nothing queued
        is sent (a client that is not reading would hold it for ever)."""
        if self.closed:
            return
        self.closed = True
        if failure is not None:
            self.failure = failure
            self._events.clear()
            self._audio.clear()
        self._wake.set()

    async def next(self) -> edge_pb2.ConverseResponse | None:
        """The next message in order, or None once closed and empty."""
        while True:
            if self._events or self._audio:
                if not self._audio or (self._events and self._events[0][0] < self._audio[0][0]):
                    return self._events.popleft()[1]
                return self._audio.popleft()[2]
            if self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()
