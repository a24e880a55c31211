"""The spans and meters of a conversation, kept out of the turn logic: the session and
the reply functions report named events here; this module turns them into one trace per
turn (linked to the session), per-turn metrics, and the edge's latency histograms.

Every span starts and ends at a named event: end of speech is when the audio at the VAD's
speech-end offset arrived, not when the VAD decided; the endpointing wait is its own span.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Link, StatusCode

from voicestack import discovery, telemetry
from voicestack.errors import StageError
from voicestack.v1 import edge_pb2


@dataclass
class TurnRecord:
    """One turn's trace and numbers."""

    index: int
    span: object = None
    stt_span: object = None
    metrics: edge_pb2.TurnMetrics = field(default_factory=edge_pb2.TurnMetrics)
    end_of_speech: float = 0.0  # monotonic: when the user's last word arrived
    tts_first_text_at: float = 0.0


class TurnObserver:
    def __init__(self, session_id: str, meters=None, trace_text: bool = False):
        self.session_id = session_id
        self.meters = meters
        self.trace_text = trace_text
        # Each turn is its own trace; this short span links them to the session.
        session_span = telemetry.start_span("session", voicestack__session__id=session_id)
        session_span.end()
        self._link = Link(session_span.get_span_context())

    # ------------------------------------------------------------ turns

    def turn(self, index: int, start_time: float | None = None) -> TurnRecord:
        return TurnRecord(index, telemetry.start_span(
            "turn", start_time=start_time, links=[self._link],
            voicestack__session__id=self.session_id, voicestack__turn__index=index))

    def speculation(self, turn: TurnRecord) -> TurnRecord:
        """A speculative reply's own record, under the turn it may answer."""
        return TurnRecord(turn.index, telemetry.start_span("speculation", parent=turn.span))

    def adopt(self, turn: TurnRecord, speculation: TurnRecord) -> None:
        """A speculation hit: its numbers so far become the turn's, its span ends."""
        m = speculation.metrics
        turn.metrics.llm_first_token_ms = m.llm_first_token_ms
        turn.metrics.tts_first_audio_ms = m.tts_first_audio_ms
        turn.metrics.completion_tokens = m.completion_tokens
        turn.metrics.llm_route, turn.metrics.llm_route_reason = m.llm_route, m.llm_route_reason
        turn.metrics.tool_calls, turn.metrics.tool_ms = m.tool_calls, m.tool_ms
        turn.metrics.speculative_hit = True
        turn.tts_first_text_at = speculation.tts_first_text_at
        telemetry.end_span(speculation.span)

    def stt_started(self, turn: TurnRecord) -> None:
        turn.stt_span = telemetry.start_span("stt", parent=turn.span, voicestack__stage="stt")

    def stt_ended(self, turn: TurnRecord, audio_seconds: float) -> None:
        if turn.stt_span is not None and turn.stt_span.is_recording():
            turn.stt_span.set_attribute("voicestack.audio_seconds", round(audio_seconds, 3))
            turn.stt_span.end()

    def endpointing(self, turn: TurnRecord, end_of_speech: float, decided: float, turn_taking,
                    turn_score: float | None = None) -> None:
        turn.end_of_speech = end_of_speech
        turn.metrics.endpointing_ms = (decided - end_of_speech) * 1000
        span = telemetry.start_span("endpointing", parent=turn.span, start_time=end_of_speech,
                                    voicestack__endpointing__mode=turn_taking.mode,
                                    voicestack__silence_ms=turn_taking.end_silence_ms)
        if turn_score is not None:  # the model decided (or was waited out): its score
            span.set_attribute("voicestack.endpointing.score", round(turn_score, 3))
            span.set_attribute("voicestack.endpointing.threshold", turn_taking.turn_threshold)
        telemetry.end_span(span, decided)

    def stt_finalized(self, turn: TurnRecord, decided: float, text: str) -> None:
        turn.metrics.stt_final_ms = (time.monotonic() - decided) * 1000
        span = telemetry.start_span("stt.finalize", parent=turn.span, start_time=decided, voicestack__stage="stt")
        if self.trace_text:
            span.set_attribute("voicestack.transcript", text)
        span.end()

    def how_it_was_said(self, turn: TurnRecord) -> None:
        m = turn.metrics
        if turn.span is not None and turn.span.is_recording():
            turn.span.set_attribute("voicestack.language", m.language)
            turn.span.set_attribute("voicestack.language_probability", round(m.language_probability, 3))
            turn.span.set_attribute("voicestack.words_per_second", round(m.words_per_second, 2))
            turn.span.set_attribute("voicestack.level_dbfs", round(m.level_dbfs, 1))

    def stage_span(self, turn: TurnRecord, name: str, stage: str, **attributes):
        return telemetry.start_span(name, parent=turn.span, voicestack__stage=stage, **attributes)

    def first_token(self, turn: TurnRecord, llm_sent: float, span) -> None:
        now = time.monotonic()
        turn.metrics.llm_first_token_ms = (now - llm_sent) * 1000
        turn.tts_first_text_at = turn.tts_first_text_at or now
        span.add_event("first_token")

    def first_audio(self, turn: TurnRecord, tts_span=None) -> None:
        now = time.monotonic()
        turn.metrics.tts_first_audio_ms = (now - (turn.tts_first_text_at or now)) * 1000
        if tts_span is not None:
            tts_span.add_event("first_audio")
        out = telemetry.start_span("first_audio_out", parent=turn.span)
        if turn.end_of_speech:
            turn.metrics.voice_to_voice_ms = (now - turn.end_of_speech) * 1000
            out.set_attribute("voicestack.voice_to_voice_ms", turn.metrics.voice_to_voice_ms)
            if turn.span is not None:
                turn.span.set_attribute("voicestack.voice_to_voice_ms", turn.metrics.voice_to_voice_ms)
        out.end()

    # ------------------------------------------------------------ outcomes

    def stage_failed(self, error: StageError) -> None:
        if self.meters:
            self.meters.errors.add(1, {"stage": error.stage or "edge", "code": error.code.name})

    def tool_call(self, span, tool: str, outcome: str, seconds: float) -> None:
        span.set_attribute("voicestack.tool.outcome", outcome)
        if outcome != "ok":
            span.set_status(StatusCode.ERROR, outcome)
        span.end()
        if self.meters:
            self.meters.tool_calls.add(1, {"tool": tool, "outcome": outcome})
            self.meters.stage_latency.record(seconds, {"stage": "edge", "kind": "tool"})

    def barge_in(self, reaction_ms: float) -> None:
        if self.meters:
            self.meters.stage_latency.record(reaction_ms / 1000, {"stage": "edge", "kind": "barge_in"})

    def turn_ended(self, turn: TurnRecord | None, *, error: StageError | None = None, dropped: bool = False,
                   cancelled: bool = False) -> None:
        """Ends the turn's spans that are still open (a turn with no answer, or cut short)."""
        if turn is None:
            return
        for span in (turn.stt_span, turn.span):
            if span is not None and span.is_recording():
                if error:
                    span.set_status(StatusCode.ERROR, str(error))
                if dropped:
                    span.set_attribute("voicestack.turn.dropped", True)
                if cancelled:
                    span.set_attribute("voicestack.turn.cancelled", True)
                span.end()

    def answered(self, turn: TurnRecord, agent_audio_ms: float) -> edge_pb2.TurnTrace:
        """A turn answered in full: its latencies recorded, its span ended, its waterfall."""
        m = turn.metrics
        m.turn_index = turn.index
        m.agent_audio_ms = agent_audio_ms
        if self.meters and turn.end_of_speech:
            self.meters.voice_to_voice.record(m.voice_to_voice_ms / 1000)
            discovery.observe_latency(m.voice_to_voice_ms / 1000, "voice_to_voice")
            for kind, value in (("endpointing", m.endpointing_ms), ("stt_final", m.stt_final_ms),
                                ("llm_first_token", m.llm_first_token_ms), ("tts_first_audio", m.tts_first_audio_ms)):
                self.meters.stage_latency.record(value / 1000, {"stage": "edge", "kind": kind})
        if turn.span is None:
            return edge_pb2.TurnTrace(turn_index=turn.index)
        turn.span.set_attribute("voicestack.agent_audio_seconds", round(agent_audio_ms / 1000, 3))
        turn.span.end()
        return self._waterfall(turn)

    def _waterfall(self, turn: TurnRecord) -> edge_pb2.TurnTrace:
        """The turn's spans recorded in this process, as offsets from the turn's start."""
        context = turn.span.get_span_context()
        spans = telemetry.turn_spans.take(context.trace_id)
        root = next((s for s in spans if s.context.span_id == context.span_id), None)
        out = edge_pb2.TurnTrace(turn_index=turn.index, trace_id=trace.format_trace_id(context.trace_id))
        if root is None:  # not sampled
            return out
        names = {s.context.span_id: s.name for s in spans}
        for s in sorted(spans, key=lambda s: s.start_time):
            out.spans.add(name=s.name, parent_name=names.get(s.parent.span_id, "") if s.parent else "",
                          start_ms=(s.start_time - root.start_time) / 1e6,
                          duration_ms=((s.end_time or s.start_time) - s.start_time) / 1e6)
        return out
