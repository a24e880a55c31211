"""One call's audio: RTP in and out (aiortp), G.711 (aiortp's table codecs), RFC 4733 DTMF
(aiortp's receiver), and the rate conversions between the phone (8 kHz) and the edge.

Out (agent -> phone): the edge's 24 kHz PCM16 is low-passed and decimated to 8 kHz here
(stateful, so 100 ms chunks join without clicks), cut into 20 ms frames and queued; a media
clock with absolute deadlines (aiortp.MediaClock) sends one packet every 20 ms, the next
queued frame or G.711 silence, so the phone hears a continuous stream with consecutive
sequence numbers and timestamps from one SSRC. `flush()` drops what is queued (barge-in).

In (phone -> agent): decoded 8 kHz PCM16 frames go to `on_audio`; the edge is told the input
is 8 kHz (SUPPORTED_RATES has it) and resamples to its pipeline's 16 kHz itself.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import numpy as np
from aiortp import MediaClock, PortAllocator, RTPSession

from voicestack.sip.sdp import PTIME_MS, Offer

log = logging.getLogger(__name__)

PHONE_RATE = 8000
FRAME_SAMPLES = PHONE_RATE * PTIME_MS // 1000  # 160
FRAME_BYTES = FRAME_SAMPLES * 2


class Downsampler:
    """Integer-ratio decimation (24 or 48 kHz -> 8 kHz) with a windowed-sinc low-pass that
    keeps its history across chunks (voicestack.audio.resample is per chunk: at 100 ms
    chunks its zero padding would click ten times a second)."""

    def __init__(self, src_rate: int, dst_rate: int = PHONE_RATE, half_taps: int = 32):
        if src_rate % dst_rate:
            raise ValueError(f"cannot decimate {src_rate} Hz to {dst_rate} Hz by an integer factor")
        self.factor = src_rate // dst_rate
        cutoff = 0.45 / self.factor
        n = np.arange(-half_taps, half_taps + 1)
        taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(n.size)
        self.taps = (taps / taps.sum()).astype(np.float32)
        self.reset()

    def reset(self) -> None:
        self.history = np.zeros(self.taps.size - 1, dtype=np.float32)
        self.phase = 0

    def __call__(self, pcm16: bytes) -> bytes:
        samples = np.frombuffer(pcm16, dtype="<i2").astype(np.float32)
        if self.factor == 1 or samples.size == 0:
            return pcm16
        x = np.concatenate([self.history, samples])
        filtered = np.convolve(x, self.taps, mode="valid")  # one output per input sample
        out = filtered[self.phase::self.factor]
        self.phase = (self.phase - samples.size) % self.factor
        self.history = x[-(self.taps.size - 1):]
        return np.clip(np.round(out), -32768, 32767).astype("<i2").tobytes()


class CallMedia:
    """The RTP session of one call and its two directions."""

    def __init__(self, session: RTPSession, offer: Offer, local_port: int,
                 on_audio: Callable[[bytes], None], on_dtmf: Callable[[str, int], None],
                 allocator: PortAllocator | None = None):
        self.session = session
        self._allocator = allocator
        self.offer = offer
        self.local_port = local_port
        self.codec = session.codec
        self._silence = self.codec.encode(bytes(FRAME_BYTES))
        self._queue: collections.deque[tuple[int, bytes]] = collections.deque()  # (turn, 20 ms PCM16)
        self._partial = b""
        self._partial_turn = 0
        self._downsampler: Downsampler | None = None
        self._clock: MediaClock | None = None
        self.played_ms: dict[int, int] = collections.defaultdict(int)  # turn -> agent audio played
        self.frames_sent = 0
        self.speech_frames_sent = 0
        self.last_rtp_in = time.monotonic()
        self.packets_in = 0
        self._on_audio = on_audio
        session.on_audio = self._received
        session.on_dtmf = on_dtmf

    @classmethod
    async def open(cls, allocator: PortAllocator, local_host: str, offer: Offer,
                   on_audio: Callable[[bytes], None], on_dtmf: Callable[[str, int], None]) -> CallMedia:
        port, _rtcp_port = await allocator.allocate()  # RuntimeError when the range is full
        try:
            session = await cls._create(local_host, port, offer)
        except BaseException:
            await allocator.release(port)
            raise
        return cls(session, offer, port, on_audio, on_dtmf, allocator)

    @staticmethod
    async def _create(local_host: str, port: int, offer: Offer) -> RTPSession:
        return await RTPSession.create(
            local_addr=(local_host, port), remote_addr=(offer.remote_host, offer.remote_port),
            payload_type=offer.payload_type,
            dtmf_payload_type=offer.dtmf_payload_type if offer.dtmf_payload_type is not None else -1,
            # Deliver each frame as soon as the next one shows it complete (no extra prefetch:
            # the edge's VAD and STT want audio now; loss is concealed, not waited for).
            jitter_capacity=16, jitter_prefetch=1, skip_audio_gaps=True, plc=True,
            symmetric_rtp=True, cname="voicestack-sip")

    # -- in ---------------------------------------------------------------------------
    def _received(self, pcm: bytes, _timestamp: int) -> None:
        self.last_rtp_in = time.monotonic()
        self.packets_in += 1
        self._on_audio(pcm)

    # -- out --------------------------------------------------------------------------
    def start(self) -> None:
        if self._clock is None:
            self._clock = MediaClock(PTIME_MS / 1000, self._tick)
            self._clock.start()

    def play(self, turn: int, pcm16: bytes, rate: int) -> None:
        """Queue agent audio (PCM16 at `rate`) for the phone."""
        if self._downsampler is None or self._downsampler.factor != rate // PHONE_RATE:
            self._downsampler = Downsampler(rate)
        data = self._downsampler(pcm16)
        if turn != self._partial_turn:
            self._partial, self._partial_turn = b"", turn
        data = self._partial + data
        whole = len(data) - len(data) % FRAME_BYTES
        for offset in range(0, whole, FRAME_BYTES):
            self._queue.append((turn, data[offset: offset + FRAME_BYTES]))
        self._partial = data[whole:]

    def finish_turn(self) -> None:
        """The turn's audio is complete: its last partial frame goes out padded."""
        if self._partial:
            self._queue.append((self._partial_turn, self._partial.ljust(FRAME_BYTES, b"\0")))
            self._partial = b""

    def flush(self) -> int:
        """Drop every queued frame (the user barged in); returns how many ms were dropped."""
        dropped = len(self._queue) * PTIME_MS
        self._queue.clear()
        self._partial = b""
        if self._downsampler is not None:
            self._downsampler.reset()
        return dropped

    @property
    def queued_ms(self) -> int:
        return len(self._queue) * PTIME_MS

    def _tick(self) -> None:
        if self._queue:
            turn, pcm = self._queue.popleft()
            payload = self.codec.encode(pcm)
            self.played_ms[turn] += PTIME_MS
            self.speech_frames_sent += 1
        else:
            payload = self._silence
        self.session.send_audio_auto(payload)
        self.frames_sent += 1

    async def close(self) -> None:
        if self._clock is not None:
            await self._clock.stop()
            self._clock = None
        try:
            await self.session.close()
        finally:
            if self._allocator is not None:
                await self._allocator.release(self.local_port)
                self._allocator = None
