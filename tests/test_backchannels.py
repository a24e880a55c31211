"""Backchannels over the agent ("mm-hm", "yeah", "right"): the agent goes on; anything
more interrupts as soon as its words are heard. Fake stages (the edge's logic only);
load/backchannels.py measures it on the real pipeline."""

from __future__ import annotations

import pytest

from edge_harness import SPEECH_ENDED, SPEECH_STARTED, Call, fast_settings
from voicestack.edge.turn_taking import is_backchannel
from voicestack.v1 import edge_pb2, llm_pb2

pytestmark = pytest.mark.fast


def ignoring(**overrides):
    return fast_settings(ignore_backchannels=True, **overrides)


@pytest.mark.parametrize("text", ["Mm-hmm.", "Mm hum.", "Uh-huh.", "Yeah, yeah.", "Right.", "Okay, I see.", "Hmm.", "",
                                  "Got it, thanks.", "Yep, right, sure."])
def test_backchannels_are_recognized(text):
    assert is_backchannel(text)


@pytest.mark.parametrize("text", ["Wait, stop.", "No, tell me about Paris.", "Yes, please tell me more.",
                                  "What time is it?", "Right, but what about tomorrow?"])
def test_anything_more_is_a_turn(text):
    assert not is_backchannel(text)


async def _long_reply(call: Call) -> None:
    call.stages.ms_per_word = 400  # a reply that plays for seconds
    await call.say(400, "tell me a long story")
    await call.wait(lambda: call.audio_of(1) > 0)


async def test_a_long_yeah_over_the_agent_does_not_interrupt_it():
    """Longer than the barge-in minimum, but only a backchannel: the agent goes on, the
    "yeah" ends unanswered and stays out of the history."""
    call = Call(ignoring())
    async with call:
        await _long_reply(call)
        call.stages.transcripts.append("Yeah, yeah, right.")
        call.vad(SPEECH_STARTED)
        await call.audio(300)
        call.stages.stt.interim("Yeah, yeah.")
        await call.audio(600)  # 900 ms: well over the 400 ms minimum
        assert not call.of("interrupted")
        call.vad(SPEECH_ENDED)
        await call.audio(20)
        await call.wait(lambda: call.ended(2))
        await call.wait(lambda: call.ended(1), 20)
        assert not call.of("interrupted")
        assert call.reply_text(1) == "reply 1 to tell me a long story." and not call.reply_text(2)
        assert not [t for t in call.of("transcript") if t.turn_index == 2], "a backchannel is private"
        [metrics] = [m for m in call.of("turn_metrics") if m.turn_index == 1]
        assert metrics.backchannels == 1 and metrics.interruptions == 0
        assert all("Yeah" not in m.content for r in call.stages.llm_requests for m in r.messages)


async def test_words_beyond_a_backchannel_interrupt_as_soon_as_they_are_heard():
    call = Call(ignoring())
    async with call:
        await _long_reply(call)
        call.vad(SPEECH_STARTED)
        await call.audio(500)
        call.stages.stt.interim("Mm-hmm.")
        await call.audio(100)
        assert not call.of("interrupted")
        call.stages.stt.interim("Mm-hmm, wait, what about")
        await call.audio(20)
        await call.wait(lambda: call.of("interrupted"))
        [interrupted] = call.of("interrupted")
        assert interrupted.turn_index == 1
        call.stages.transcripts.append("Mm-hmm, wait, what about dragons?")
        call.vad(SPEECH_ENDED)
        await call.audio(20)
        await call.wait(lambda: call.ended(2))
        assert call.reply_text(2).endswith("Mm-hmm, wait, what about dragons?.")


async def test_a_short_request_is_heard_at_its_end_and_interrupts_then():
    """ "Stop." over the agent: no interim came while it was spoken; the final transcript
    is more than a backchannel, so the reply is interrupted then and the turn answered."""
    call = Call(ignoring())
    async with call:
        await _long_reply(call)
        await call.say(500, "Stop, please.")
        await call.wait(lambda: call.of("interrupted"))
        await call.wait(lambda: call.ended(2))
        assert call.of("interrupted")[0].turn_index == 1
        assert [t.text for t in call.of("transcript") if t.turn_index == 2] == ["Stop, please."]
        assert call.reply_text(2).endswith("Stop, please..")


async def test_speech_past_the_backchannel_limit_interrupts_without_words():
    call = Call(ignoring(), config=edge_pb2.SessionConfig(interruption=edge_pb2.InterruptionConfig(backchannel_max_ms=800)))
    async with call:
        await _long_reply(call)
        call.vad(SPEECH_STARTED)
        await call.audio(600)
        assert not call.of("interrupted")
        await call.audio(300)
        await call.wait(lambda: call.of("interrupted"))


async def test_a_session_can_choose_the_fastest_reaction():
    call = Call(ignoring(), config=edge_pb2.SessionConfig(
        interruption=edge_pb2.InterruptionConfig(backchannels=edge_pb2.BACKCHANNELS_INTERRUPT)))
    async with call:
        await _long_reply(call)
        call.vad(SPEECH_STARTED)
        await call.audio(500)  # no words yet: the length alone interrupts
        await call.wait(lambda: call.of("interrupted"))


async def test_the_server_default_can_turn_it_off():
    call = Call(fast_settings(ignore_backchannels=False))
    async with call:
        await _long_reply(call)
        call.vad(SPEECH_STARTED)
        await call.audio(500)
        await call.wait(lambda: call.of("interrupted"))
        history = call.stages.llm_requests[-1].messages
        assert [m.role for m in history][:2] == [llm_pb2.CHAT_ROLE_SYSTEM, llm_pb2.CHAT_ROLE_USER]
