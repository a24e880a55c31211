"""The edge's conversation logic on fake stages, in process: seconds, not minutes.

These test the turn contract (every turn ends exactly once, whatever fails where),
barge-in, ordering and the pure helpers. They say nothing about whether speech is
understood or spoken: the real-process tests do.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from edge_harness import SPEECH_ENDED, SPEECH_STARTED, Call, fast_settings
from voicestack.edge.recognition import RING_MS, AudioBuffer
from voicestack.edge.turn_taking import same_words
from voicestack.edge.speech import heard_text
from voicestack.errors import code_from_int
from voicestack.v1 import edge_pb2, llm_pb2

pytestmark = pytest.mark.fast


# ---------------------------------------------------------------- pure helpers

def test_same_words_allows_one_word_in_five():
    assert same_words("What is the capital of France?", "what is the capital on france")
    assert not same_words("What is the capital", "What is the capital of France and of Spain?")
    assert not same_words("", "")


def test_heard_text_takes_whole_clauses_and_part_of_the_one_playing():
    spoken = [("One two three four.", 0.0), ("Five six.", 1000.0)]
    assert heard_text(spoken, 0, 2000) == ""
    assert heard_text(spoken, 500, 2000) == "One two"
    assert heard_text(spoken, 1000, 2000) == "One two three four."
    assert heard_text(spoken, 2000, 2000) == "One two three four. Five six."


def test_ring_buffer_keeps_a_burst_until_the_vad_can_decide(monkeypatch):
    """A 4 s network stall flushed at once: the audio stays although it is over RING_MS
    long, because it arrived just now (issue: the speech start in it was trimmed)."""
    buffer = AudioBuffer()
    for _ in range(200):  # 4 s of 20 ms frames, all arriving now
        buffer.append(b"\1\0" * 320)
        buffer.trim()
    assert buffer.base_ms == 0 and len(buffer.between(0)) == 4000 * 32
    now = [0.0]
    import voicestack.edge.recognition as recognition
    monkeypatch.setattr(recognition.time, "monotonic", lambda: now[0] + 1e6)
    buffer.append(b"\1\0" * 320)
    buffer.trim()  # seconds later: only the last RING_MS stay
    assert buffer.end_ms - buffer.base_ms <= RING_MS + 1000


# ---------------------------------------------------------------- the turn contract

async def test_a_turn_is_answered_and_the_history_kept():
    async with Call() as call:
        await call.say(400, "what is the time")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == "reply 1 to what is the time."
        assert call.audio_of(1) > 0
        await call.say(400, "and the date")
        await call.wait(lambda: call.ended(2))
        request = call.stages.llm_requests[-1]
        assert [(m.role, m.content) for m in request.messages[1:]] == [
            (llm_pb2.CHAT_ROLE_USER, "what is the time"),
            (llm_pb2.CHAT_ROLE_ASSISTANT, "reply 1 to what is the time."),
            (llm_pb2.CHAT_ROLE_USER, "and the date")]
        await call.hang_up()
    assert call.status is None
    assert not call.stages.open_streams()


async def test_a_session_asks_the_llm_replica_of_its_last_turn_first():
    """Prefix-cache affinity (#18): the second turn's request goes first to the replica
    that served the first, where the conversation is still in its KV cache."""
    async with Call() as call:
        await call.say(400, "what is the time")
        await call.wait(lambda: call.ended(1))
        first = [s for s in call.stages.opened if s.stage == "llm"][-1].replica_id
        await call.say(400, "and the date")
        await call.wait(lambda: call.ended(2))
        await call.hang_up()
    assert [replica for stage, replica in call.stages.asked_replicas if stage == "llm"] == ["", first]

    async with Call(fast_settings(llm_affinity=False)) as call:  # off: any replica, every turn
        for index, words in enumerate(("what is the time", "and the date"), 1):
            await call.say(400, words)
            await call.wait(lambda: call.ended(index))
        await call.hang_up()
    assert [replica for stage, replica in call.stages.asked_replicas if stage == "llm"] == ["", ""]


STAGE_FAILURES = [(stage, point) for stage, points in {
    "stt": ("open", "first", "end", "stall"),
    "llm": ("open", "first", "mid", "end", "stall"),
    "tts": ("open", "first", "mid", "end", "stall"),
}.items() for point in points]


@pytest.mark.parametrize("stage, point", STAGE_FAILURES)
async def test_a_stage_failing_at_any_point_ends_the_turn_once_and_the_call_goes_on(stage, point):
    async with Call() as call:
        call.stages.fail(stage, point, grpc.StatusCode.INTERNAL)
        await call.say(400, "first question")
        await call.wait(lambda: call.ended(1))
        errors = call.of("error")
        assert len(errors) == 1 and errors[0].stage == stage, errors
        kinds = [e.WhichOneof("kind") for e in call.events]
        at = kinds.index("error")
        assert kinds[at + 1] == "agent_turn_ended" and call.events[at + 1].agent_turn_ended.turn_index == 1
        if point == "stall":
            assert code_from_int(errors[0].code) == grpc.StatusCode.DEADLINE_EXCEEDED
        await call.say(400, "second question")  # the same call goes on
        await call.wait(lambda: call.ended(2))
        assert call.reply_text(2) and call.audio_of(2)
        assert len(call.of("error")) == 1
        await call.hang_up()
    assert call.status is None
    assert not call.stages.open_streams(), call.stages.open_streams()


async def test_a_refused_tts_cancels_the_llm_stream_opened_beside_it():
    async with Call() as call:
        call.stages.fail("tts", "open", grpc.StatusCode.RESOURCE_EXHAUSTED)
        await call.say(400, "question")
        await call.wait(lambda: call.ended(1))
        [llm] = [s for s in call.stages.opened if s.stage == "llm"]
        assert llm.cancelled
        [error] = call.of("error")
        assert error.stage == "tts" and code_from_int(error.code) == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_tts_replica_lost_mid_reply_resumes_at_the_clause_not_delivered():
    async with Call() as call:
        call.stages.fail("tts", "after:3", grpc.StatusCode.UNAVAILABLE)  # clauses "reply", "1" whole, "to" maybe not
        await call.say(400, "tell me")
        await call.wait(lambda: call.ended(1))
        assert not call.of("error")
        tts = [s for s in call.stages.opened if s.stage == "tts"]
        assert len(tts) == 2
        first_texts = "".join(m.text for m in tts[0].inputs if m.WhichOneof("kind") == "text")
        resumed = "".join(m.text for m in tts[1].inputs if m.WhichOneof("kind") == "text")
        # The new stream starts at the clause that may not have arrived whole, not at the beginning.
        assert first_texts.startswith("reply 1 to")
        assert resumed.startswith(" to") and resumed.endswith("me."), resumed
        assert call.reply_text(1) == "reply 1 to tell me."


async def test_barge_in_stops_the_reply_and_keeps_only_what_was_heard():
    call = Call()
    call.stages.ms_per_word = 400  # a reply that plays for seconds
    async with call:
        await call.say(400, "tell me a long story")
        await call.wait(lambda: call.audio_of(1) > 0)
        await asyncio.sleep(0.5)
        call.vad(SPEECH_STARTED)
        await call.audio(500)  # over the 400 ms minimum: an interruption
        await call.wait(lambda: call.ended(1))
        [interrupted] = call.of("interrupted")
        assert interrupted.turn_index == 1 and interrupted.played_ms >= 400
        kinds = [(e.WhichOneof("kind"), getattr(e, e.WhichOneof("kind")).turn_index if e.HasField("agent_audio") else 0)
                 for e in call.events]
        at = kinds.index(("interrupted", 0))
        assert ("agent_audio", 1) not in kinds[at:], "agent audio after Interrupted"
        llm = [s for s in call.stages.opened if s.stage == "llm"][0]
        assert llm.cancelled or llm.done
        call.vad(SPEECH_ENDED)
        await call.audio(20)
        await call.wait(lambda: call.ended(2))
        history = call.stages.llm_requests[-1].messages
        said = [m.content for m in history if m.role == llm_pb2.CHAT_ROLE_ASSISTANT]
        assert said == [interrupted.heard_text] and said[0]
        assert len(said[0].split()) < len("reply 1 to tell me a long story.".split())


async def test_a_cough_over_the_agent_does_not_interrupt():
    call = Call()
    call.stages.ms_per_word = 300
    async with call:
        await call.say(400, "tell me a story")
        await call.wait(lambda: call.audio_of(1) > 0)
        await call.say(100)  # shorter than the barge-in minimum
        await call.wait(lambda: call.ended(1))
        assert not call.of("interrupted") and call.reply_text(1)
        assert call.ended(2) and not call.reply_text(2)  # the cough's turn ends, unanswered


async def test_a_monologue_part_under_the_disclosure_is_never_a_cough():
    """A tiny max_utterance_ms and a question asked during the disclosure (issue: the last
    part was dropped as a cough and the question never answered)."""
    call = Call(fast_settings(disclosure=True),
                edge_pb2.SessionConfig(endpointing=edge_pb2.EndpointingConfig(max_utterance_ms=1000)))
    call.stages.ms_per_word = 400
    async with call:
        for text in ("what is", "the capital"):
            call.stages.transcripts.append(text)
        call.vad(SPEECH_STARTED)
        await call.audio(1300)
        call.vad(SPEECH_ENDED)
        await call.audio(20)
        await call.wait(lambda: any(e.text for e in call.of("agent_turn_ended") if e.turn_index > 0), 10)
        answered = [e for e in call.of("agent_turn_ended") if e.turn_index > 0 and e.text]
        assert len(answered) == 1 and "what is the capital" in answered[0].text


async def test_every_turn_ends_when_the_client_hangs_up_mid_speech():
    async with Call() as call:
        call.vad(SPEECH_STARTED)
        await call.audio(300)
        await call.hang_up()
    assert call.ended(1)
    assert not call.stages.open_streams()


async def test_a_client_that_stops_reading_is_ended_without_holding_streams():
    async with Call() as call:
        for _ in range(3000):
            call.session.output.send(speech_started=edge_pb2.SpeechStarted())
        await call.wait(lambda: call.session.output.closed)
        assert call.session.output.failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not call.stages.open_streams()


async def test_a_vad_that_cannot_be_reopened_ends_the_call_with_its_status():
    async with Call() as call:
        call.stages.fail("vad", "open", grpc.StatusCode.UNAVAILABLE)
        await call.stages.vad.fail_now(grpc.StatusCode.UNAVAILABLE)
        await call.wait(lambda: call.session.output.closed)
        assert call.session.output.failure.code == grpc.StatusCode.UNAVAILABLE
        assert call.session.output.failure.stage == "vad"


async def test_a_monologue_at_the_longest_setting_stays_under_the_stt_limit():
    """max_utterance_ms at its allowed maximum and 65 s of speech (issue: the edge sent
    60.02 s, the STT refused, the first 60 s were lost and the Error came twice)."""
    call = Call(config=edge_pb2.SessionConfig(endpointing=edge_pb2.EndpointingConfig(max_utterance_ms=60000)))
    async with call:
        call.stages.transcripts.extend(["the first minute", "and the rest"])
        call.vad(SPEECH_STARTED)
        await call.audio(65000)
        call.vad(SPEECH_ENDED)
        await call.audio(20)
        await call.wait(lambda: any(e.text for e in call.of("agent_turn_ended")), 10)
        stt = [s for s in call.stages.opened if s.stage == "stt"]
        seconds = [sum(len(m.audio.pcm) for m in s.inputs if m.WhichOneof("kind") == "audio") / 32000 for s in stt]
        assert len(stt) == 2 and max(seconds) < 60, seconds
        assert not call.of("error")
        [answered] = [e for e in call.of("agent_turn_ended") if e.text]
        assert "the first minute and the rest" in answered.text


async def test_a_long_call_keeps_its_requests_bounded():
    """The LLM stage fits the history to its context by tokens; the edge only bounds the
    message count (the stage refuses over 200), oldest turns first, the system prompt kept."""
    from voicestack.edge.session import MAX_HISTORY_MESSAGES
    async with Call() as call:
        for n in range(MAX_HISTORY_MESSAGES // 2 + 5):
            await call.say(100, f"question {n}")
            await call.wait(lambda: call.ended(n + 1))
        messages = call.stages.llm_requests[-1].messages
        assert len(messages) <= MAX_HISTORY_MESSAGES + 1
        assert messages[0].role == llm_pb2.CHAT_ROLE_SYSTEM and messages[-1].content == f"question {n}"
        assert "question 0" not in [m.content for m in messages]


# ---------------------------------------------------------------- how it was said

@pytest.mark.parametrize("notes", [edge_pb2.VOICE_NOTES_ON, edge_pb2.VOICE_NOTES_OFF])
async def test_how_a_turn_was_said_is_in_its_metrics_and_with_notes_on_in_the_llm_request(notes):
    async with Call(config=edge_pb2.SessionConfig(voice_notes=notes)) as call:
        await call.say(400, "what time is it")
        await call.wait(lambda: call.ended(1))
        m = call.of("turn_metrics")[0]
        assert m.words_per_second == pytest.approx(4 / 0.4, rel=0.15)  # 4 words in 400 ms of speech
        assert m.level_dbfs == -100.0  # the harness's frames are silence
        user = call.stages.llm_requests[0].messages[-1].content
        if notes == edge_pb2.VOICE_NOTES_ON:
            assert user.startswith("what time is it [voice: ") and "words/s" in user and "dBFS" in user, user
        else:
            assert user == "what time is it"
        await call.hang_up()
