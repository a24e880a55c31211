"""Recording a call, by policy: off unless the operator turns it on (`recording`), and then
only after the caller consents.

Consent comes from the client (`SessionConfig.recording_consent`: an app that asked its
user itself) or is asked for: after the disclosure the agent says `consent_text`, and the
caller's next turn answers it. A clear yes starts the recording (the agent says
`consent_yes_text`); anything else means no (`consent_no_text` for a clear no; any other
turn is answered as usual and nothing is recorded).

Both sides go on one timeline: the caller's audio as it arrives (16 kHz), the agent's as it
is sent (24 kHz), padded with silence to where the caller's audio had got, so the two files
line up. Transcripts are recorded after the "record" processors (PII redaction). The store
(recordings.py) is written at the end of the call, off the event loop; a store that fails
leaves the recording marked incomplete with the gap logged, never the call ended.
"""

from __future__ import annotations

import asyncio
import logging
import re

from voicestack import recordings
from voicestack.audio import PIPELINE_RATE, float_to_pcm16, pcm16_to_float, resample

log = logging.getLogger(__name__)

AGENT_RATE = 24000
YES = re.compile(r"\b(yes|yeah|yep|sure|okay|ok|i agree|i consent|i do|go ahead|fine|of course|alright|all right)\b")
NO = re.compile(r"\b(no|nope|don t|do not|i disagree|i refuse|rather not|not)\b")


def consent_answer(text: str) -> bool | None:
    """True for a clear yes, False for a clear no, None for anything else."""
    words = " ".join("".join(c.lower() if c.isalnum() else " " for c in text).split())
    if NO.search(words):
        return False  # ("yes, no, don't": a no anywhere is a no)
    return True if YES.search(words) else None


class CallRecording:
    """One call's recording, from consent to the store."""

    def __init__(self, store, session_id: str, retention_days: int, consent: str):
        self.writer = recordings.RecordingWriter(store, session_id, retention_days, consent)
        self.session_id = session_id
        self._user_samples = 0  # the timeline: caller audio so far, in 16 kHz samples
        self._agent_samples = 0  # agent audio so far, in 24 kHz samples
        self.agent_said: list[tuple[int, str]] = []  # (turn, words), raw: redacted at close

    def user_audio(self, pcm: bytes) -> None:
        self.writer.add_user_audio(pcm)
        self._user_samples += len(pcm) // 2

    def agent_audio(self, pcm: bytes, sample_rate: int) -> None:
        if sample_rate != AGENT_RATE:  # (the embedded TTS speaks at 24 kHz; a GPU one may not)
            pcm = float_to_pcm16(resample(pcm16_to_float(pcm), sample_rate, AGENT_RATE))
        now = self._user_samples * AGENT_RATE // PIPELINE_RATE
        if now > self._agent_samples:  # silence up to where the caller's audio has got
            self.writer.add_agent_audio(b"\0\0" * (now - self._agent_samples))
            self._agent_samples = now
        self.writer.add_agent_audio(pcm)
        self._agent_samples += len(pcm) // 2

    def transcript(self, turn: int, role: str, text: str) -> None:
        """`text` already through the record processors."""
        if text:
            self.writer.add_transcript(turn, role, text)

    async def close(self) -> None:
        try:
            result = await asyncio.to_thread(self.writer.close)
        except recordings.StoreUnavailable as error:  # not even its manifest: the call is over anyway
            log.error("session %s: recording LOST, the store is unavailable: %s", self.session_id, error)
            return
        if result.complete:
            log.info("session %s: recording stored", self.session_id)
        else:
            log.warning("session %s: recording stored INCOMPLETE, gaps: %s", self.session_id, result.gaps)
