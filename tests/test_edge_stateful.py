"""Random interleavings of a call against the edge's turn contract (fake stages, in process).

Hypothesis drives speech start/pause/resume/end, audio, playback reports, barge-in (speech
over a reply), VAD replica loss, stage failures at every point (open, first output, mid-
stream, end, stall) and the client hanging up. After every step:
  - every turn ends at most once (AgentTurnEnded or Interrupted);
  - no agent audio of a turn reaches the client after that turn ended or was interrupted;
  - every Error is followed at once by its turn's AgentTurnEnded;
  - the history holds only words the agent sent as audio;
and when the call is over: every turn ended exactly once, and nothing is left running.
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis import event as count_in_statistics
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from edge_harness import SPEECH_ENDED, SPEECH_PAUSED, SPEECH_RESUMED, SPEECH_STARTED, Call, fast_settings
from voicestack.v1 import edge_pb2, llm_pb2

pytestmark = pytest.mark.fast

EXAMPLES = int(os.environ.get("EDGE_STATEFUL_EXAMPLES", "500"))
POINTS = ("open", "first", "mid", "end", "stall")
CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED)


class EdgeConversation(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.call = None
        self.speaking = False
        self.hung_up = False

    def run(self, coroutine, seconds: float = 20.0):
        # Bounded, so a hang is a failure with a traceback, not a stuck run.
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, seconds))

    @initialize(disclosure=st.booleans(), speculation=st.booleans(), ms_per_word=st.sampled_from([1, 15, 15]))
    def start(self, disclosure, speculation, ms_per_word):
        config = edge_pb2.SessionConfig(
            endpointing=edge_pb2.EndpointingConfig(
                speculation=edge_pb2.SPECULATION_MODE_ON if speculation else edge_pb2.SPECULATION_MODE_OFF,
                max_utterance_ms=1000 if speculation else 0),
            interruption=edge_pb2.InterruptionConfig(min_speech_ms=100))  # barge-in within one audio step
        # A short lead: replies play out in tens of ms, so 500 examples take seconds, not minutes.
        self.call = Call(fast_settings(disclosure=disclosure, stage_stall_seconds=0.02, audio_lead_ms=20), config)
        self.call.stages.ms_per_word = ms_per_word
        self.run(self.call.__aenter__())

    def live(self) -> bool:
        return self.call is not None and not self.hung_up

    @rule(text=st.sampled_from(["hello there", "what is the time", "", "tell me a story please"]))
    def speech_starts(self, text):
        if not (self.live() and not self.speaking):
            return  # (not now: a no-op keeps hypothesis from retrying draws)
        self.call.stages.transcripts.append(text)
        self.call.vad(SPEECH_STARTED)
        self.speaking = True
        self.run(self.call.settle())

    @rule(text=st.sampled_from(["hello there", "what is the time", "", "tell me a story please"]),
          ms=st.sampled_from([100, 300, 600]))
    def user_says(self, text, ms):
        """A whole utterance at once (over the agent, if it is speaking: a barge-in or a cough)."""
        if not (self.live() and not self.speaking):
            return  # (not now: a no-op keeps hypothesis from retrying draws)
        self.call.stages.transcripts.append(text)
        self.call.vad(SPEECH_STARTED)
        self.run(self.call.audio(ms))
        self.call.vad(SPEECH_ENDED)
        self.run(self.call.audio(20))

    @rule(ms=st.sampled_from([20, 100, 300, 600]))
    def audio(self, ms):
        if not (self.live()):
            return  # (not now: a no-op keeps hypothesis from retrying draws)
        self.run(self.call.audio(ms))

    @rule(resume=st.booleans())
    def speech_pauses(self, resume):
        if not (self.live() and self.speaking):
            return  # (not now: a no-op keeps hypothesis from retrying draws)
        self.call.vad(SPEECH_RESUMED if resume else SPEECH_PAUSED)
        self.run(self.call.settle())

    @rule()
    def speech_ends(self):
        if not (self.live() and self.speaking):
            return  # (not now: a no-op keeps hypothesis from retrying draws)
        self.call.vad(SPEECH_ENDED)
        self.speaking = False
        self.run(self.call.audio(20))

    @rule(played=st.integers(0, 5000))
    def playback_report(self, played):
        if not (self.live()):
            return  # (not now: a no-op keeps hypothesis from retrying draws)
        turns = [e.agent_audio.turn_index for e in self.call.events if e.HasField("agent_audio")]
        if turns:
            self.call.session.on_playback(edge_pb2.PlaybackPosition(turn_index=turns[-1], played_ms=played))
            self.run(self.call.settle())

    @rule(stage=st.sampled_from(["stt", "llm", "tts"]), point=st.sampled_from(POINTS), code=st.sampled_from(CODES))
    def a_stage_will_fail(self, stage, point, code):
        if not (self.live()):
            return  # (not now: a no-op keeps hypothesis from retrying draws)
        self.call.stages.fail(stage, point, code)

    @rule()
    def vad_replica_dies(self):
        if not (self.live()):
            return  # (not now: a no-op keeps hypothesis from retrying draws)
        self.run(self.call.stages.vad.fail_now(grpc.StatusCode.UNAVAILABLE))
        self.run(self.call.settle())

    @rule(ms=st.sampled_from([0, 0, 5, 30]))
    def time_passes(self, ms):
        if not (self.call is not None):
            return  # (not now: a no-op keeps hypothesis from retrying draws)
        self.run(asyncio.sleep(ms / 1000) if ms else self.call.settle())

    @rule()
    def client_hangs_up(self):
        if not (self.live()):
            return  # (not now: a no-op keeps hypothesis from retrying draws)
        self.hung_up = True
        self.call.session.finish_input()
        self.run(self.call.settle())

    # ------------------------------------------------------------ after every step

    def kinds(self):
        """Every event the client got, and those queued for it (the reader may lag a step)."""
        if self.call is None:
            return []
        return [(e.WhichOneof("kind"), e) for e in [*self.call.events, *self.call.session.output.pending()]]

    @invariant()
    def every_turn_ends_at_most_once_and_is_silent_after(self):
        ended: set[int] = set()
        for kind, event in self.kinds():
            if kind in ("agent_turn_ended", "interrupted"):
                index = getattr(event, kind).turn_index
                assert index not in ended, f"turn {index} ended twice"
                ended.add(index)
            elif kind == "agent_audio":
                assert event.agent_audio.turn_index not in ended, "agent audio after its turn ended"

    @invariant()
    def every_error_is_followed_by_its_turn_end(self):
        events = self.kinds()
        for i, (kind, _) in enumerate(events):
            if kind == "error" and i + 1 < len(events):
                assert events[i + 1][0] == "agent_turn_ended", [k for k, _ in events[i:i + 3]]

    @invariant()
    def the_history_holds_only_what_was_sent_as_audio(self):
        if self.call is None or not self.call.stages.llm_requests:
            return
        sent_words = set()
        for kind, event in self.kinds():
            if kind == "agent_turn_ended":
                sent_words |= set(event.agent_turn_ended.text.split())
            elif kind == "interrupted":
                sent_words |= set(event.interrupted.heard_text.split())
        for message in self.call.session.history:
            if message.role == llm_pb2.CHAT_ROLE_ASSISTANT:
                assert set(message.content.split()) <= sent_words, message

    def teardown(self):
        try:
            if self.call is None:
                return
            if not self.hung_up:
                if self.speaking:
                    self.call.vad(SPEECH_ENDED)
                self.call.session.finish_input()
            self.run(self.call.wait(lambda: self.call.session.output.closed and self.call._reader.done(), 10))
            assert self.call.status is None, self.call.status
            started = {0} if self.call.settings.disclosure else set()
            started |= {e.speech_started.turn_index for e in self.call.events if e.HasField("speech_started")}
            ended = [getattr(e, k).turn_index for k, e in self.kinds() if k in ("agent_turn_ended", "interrupted")]
            assert sorted(ended) == sorted(set(ended)) and set(ended) == started, (sorted(started), ended)
            kinds = {k for k, _ in self.kinds()}
            for seen in ("interrupted", "error", "agent_audio"):  # (--hypothesis-show-statistics)
                count_in_statistics(f"{seen}: {seen in kinds}")
            count_in_statistics(f"speculative hit: {any(m.speculative_hit for m in self.call.of('turn_metrics'))}")
            self.run(self.call.__aexit__(None, None, None))
            assert not self.call.stages.open_streams(), self.call.stages.open_streams()
            leftover = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            assert not leftover, leftover
        finally:
            self.loop.close()


EdgeConversation.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_edge_conversation = EdgeConversation.TestCase
