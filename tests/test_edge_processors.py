"""Processors on the conversation's text, and recording by consent, on fake stages: the
edge's logic (which text goes where, what a failure does, what is stored). The shipped
processors are tested in test_processors.py, the stores in test_recordings.py, and all of
it through real processes in test_compliance.py."""

from __future__ import annotations

import io
import json
import wave

import grpc
import pytest

from edge_harness import Call, fast_settings
from voicestack import recordings
from voicestack.edge.recording import consent_answer
from voicestack.edge.server import EdgeService
from voicestack.v1 import edge_pb2, llm_pb2

pytestmark = pytest.mark.fast


class Upper:
    name, applies_to, fail_closed = "upper", frozenset({"agent"}), False

    async def process(self, text, place):
        return text.upper()


class Broken:
    def __init__(self, places, fail_closed):
        self.name, self.applies_to, self.fail_closed = "broken", frozenset(places), fail_closed
        self.calls = 0

    async def process(self, text, place):
        self.calls += 1
        raise RuntimeError("the rules file is missing")


class MaskDigits:
    name, applies_to, fail_closed = "mask", frozenset({"record"}), True

    async def process(self, text, place):
        return "".join("#" if c.isdigit() else c for c in text)


def tts_text(call: Call, turn_stream: int) -> str:
    tts = [s for s in call.stages.opened if s.stage == "tts"][turn_stream]
    return "".join(m.text for m in tts.inputs if m.WhichOneof("kind") == "text")


async def test_an_agent_processor_changes_what_is_said_clause_by_clause():
    async with Call(processors=[Upper()]) as call:
        await call.say(400, "tell me something")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == "REPLY 1 TO TELL ME SOMETHING."
        assert tts_text(call, 0).strip() == "REPLY 1 TO TELL ME SOMETHING."
        await call.say(400, "again")
        await call.wait(lambda: call.ended(2))
        said = [m.content for m in call.stages.llm_requests[-1].messages if m.role == llm_pb2.CHAT_ROLE_ASSISTANT]
        assert said == ["REPLY 1 TO TELL ME SOMETHING."], "the history keeps what was said"


async def test_a_fail_open_processor_passes_the_text_on():
    broken = Broken({"user", "agent"}, fail_closed=False)
    async with Call(processors=[broken]) as call:
        await call.say(400, "hello")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == "reply 1 to hello." and not call.of("error")
        assert broken.calls >= 2


async def test_a_fail_closed_processor_ends_the_turn_with_one_error_naming_it_and_the_call_goes_on():
    broken = Broken({"user"}, fail_closed=True)
    async with Call(processors=[broken]) as call:
        await call.say(400, "my card is 4111")
        await call.wait(lambda: call.ended(1))
        [error] = call.of("error")
        assert error.stage == "processors" and "'broken'" in error.message
        assert "4111" not in error.message, "the error names the processor, not the text"
        assert error.code == grpc.StatusCode.INTERNAL.value[0]
        assert not call.reply_text(1) and not call.stages.llm_requests
        broken.applies_to = frozenset()
        await call.say(400, "hello")
        await call.wait(lambda: call.ended(2))
        assert call.reply_text(2) == "reply 1 to hello."


# ---------------------------------------------------------------- recording by consent

def recording_settings(**overrides):
    return fast_settings(recording=True, recording_store="unused: the test passes the store", **overrides)


def stored(store, name: str) -> bytes:
    return store.get(f"recordings/fake-session/{name}")


@pytest.mark.parametrize("text, expected", [
    ("Yes, I agree.", True), ("Sure, go ahead.", True), ("No.", False), ("I don't want that.", False),
    ("Yes, no, I don't know.", False), ("What time is it?", None), ("", None)])
def test_consent_answers(text, expected):
    assert consent_answer(text) is expected


async def test_consent_is_asked_and_a_yes_records_both_sides_with_redacted_words(tmp_path):
    store = recordings.VolumeStore(tmp_path)
    call = Call(recording_settings(), processors=[MaskDigits()], recording_store=store)
    async with call:
        await call.wait(lambda: call.ended(0))
        assert tts_text(call, 0).strip() == call.settings.consent_text
        await call.say(400, "Yes, I agree.")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == call.settings.consent_yes_text
        assert not call.stages.llm_requests, "the consent answer is not the LLM's business"
        await call.say(600, "My card is 4111 1111 1111 1111.")
        await call.wait(lambda: call.ended(2))
        assert "4111 1111" in call.reply_text(2)  # (what the LLM saw and said: redacting that is pii_redact_llm)
        await call.hang_up()
    manifest = recordings.read_manifest(store, "fake-session")
    assert manifest["consent"] == "spoken" and manifest["complete"]
    transcript = json.loads(stored(store, "transcript.json"))
    lines = [(t["turn"], t["role"], t["text"]) for t in transcript]
    assert (2, "user", "My card is #### #### #### ####.") in lines
    assert any(role == "agent" and "####" in text for _, role, text in lines)
    assert "4111" not in json.dumps(transcript)
    assert not any(turn == 1 and role == "user" for turn, role, _ in lines), "recording starts after the yes"
    for name, rate in (("user.wav", 16000), ("agent.wav", 24000)):
        with wave.open(io.BytesIO(stored(store, name))) as wav:
            assert wav.getframerate() == rate and wav.getnframes() > 0


async def test_a_no_records_nothing(tmp_path):
    store = recordings.VolumeStore(tmp_path)
    call = Call(recording_settings(), recording_store=store)
    async with call:
        await call.wait(lambda: call.ended(0))
        await call.say(400, "No thanks.")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == call.settings.consent_no_text
        await call.say(400, "hello")
        await call.wait(lambda: call.ended(2))
        assert call.reply_text(2) == "reply 1 to hello."
        await call.hang_up()
    assert recordings.sessions(store) == []


async def test_an_app_that_asked_its_user_skips_the_question(tmp_path):
    store = recordings.VolumeStore(tmp_path)
    call = Call(recording_settings(), edge_pb2.SessionConfig(recording_consent=True), recording_store=store)
    async with call:
        await call.say(400, "hello")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == "reply 1 to hello."
        await call.hang_up()
    streams = [s for s in call.stages.opened if s.stage == "tts"]
    assert not any(call.settings.consent_text in tts_text(call, n) for n in range(len(streams)))
    assert recordings.read_manifest(store, "fake-session")["consent"] == "client"


def test_recording_on_without_a_store_stops_the_edge_naming_the_setting():
    with pytest.raises(ValueError, match="recording_store"):
        EdgeService(fast_settings(recording=True))


async def test_a_yes_over_the_consent_question_is_an_answer_not_a_backchannel(tmp_path):
    store = recordings.VolumeStore(tmp_path)
    call = Call(recording_settings(ignore_backchannels=True), recording_store=store)
    call.stages.ms_per_word = 300  # the question plays for seconds
    async with call:
        await call.wait(lambda: call.audio_of(0) > 0)
        await call.say(500, "Yes.")  # "yes" alone over the agent would be a backchannel
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == call.settings.consent_yes_text
        assert call.session.recording is not None


# ---------------------------------------------------------------- the caller's keypad

async def test_keys_pressed_make_one_turn_ended_by_the_hash_key():
    async with Call() as call:
        for digits in ("4", "2", "#"):
            call.session.on_dtmf(digits)
            await call.settle()
        await call.wait(lambda: call.ended(1))
        assert [t.text for t in call.of("transcript") if t.turn_index == 1] == ["[keypad: 4 2 #]"]
        assert call.reply_text(1) == "reply 1 to [keypad: 4 2 #]."


async def test_keys_without_a_hash_end_their_turn_after_a_pause(monkeypatch):
    import voicestack.edge.session as session_module
    monkeypatch.setattr(session_module, "KEYPAD_PAUSE_S", 0.05)
    async with Call() as call:
        call.session.on_dtmf("7")
        call.session.on_dtmf("3")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == "reply 1 to [keypad: 7 3]."


async def test_one_on_the_keypad_consents_and_the_digits_are_never_recorded(tmp_path):
    store = recordings.VolumeStore(tmp_path)
    call = Call(recording_settings(), recording_store=store)
    async with call:
        await call.wait(lambda: call.ended(0))
        call.session.on_dtmf("1#")
        await call.wait(lambda: call.ended(1))
        assert call.reply_text(1) == call.settings.consent_yes_text
        call.session.on_dtmf("1234#")
        await call.wait(lambda: call.ended(2))
        await call.hang_up()
    assert recordings.read_manifest(store, "fake-session")["consent"] == "dtmf"
    transcript = json.loads(stored(store, "transcript.json"))
    assert [t["text"] for t in transcript if t["role"] == "user"] == ["[keypad: 5 keys]"]
