"""The whole pipeline through real processes: nats-server, five services, real models,
speech streamed at real-time pace over gRPC."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import HUMAN_RECORDING, silence, speak, words
from voicestack.client import LiveMicrophone
from voicestack.audio import read_wav, resample
from voicestack.client import converse
from voicestack.stt.engine import WhisperEngine
from voicestack.v1 import edge_pb2


@pytest.fixture(scope="module")
def whisper():
    return WhisperEngine()


async def test_spoken_question_gets_a_spoken_answer(edge_address, speech_dir, whisper):
    question = np.concatenate([silence(300), speak("What is the capital of France?", speech_dir)])
    conversation = await converse(edge_address, question, timeout=90)

    assert conversation.status.name == "OK", conversation.details
    assert not conversation.errors, conversation.errors
    [turn] = conversation.replies
    assert {"capital", "france"} <= set(words(turn.transcript)), turn.transcript
    assert turn.reply_text.strip(), "the agent said nothing"
    assert turn.ended and turn.metrics is not None

    # The agent's audio says what its text says: run it back through Whisper.
    agent_audio = np.frombuffer(bytes(turn.audio), dtype="<i2").astype(np.float32) / 32768.0
    assert agent_audio.size / conversation.output_rate > 0.5
    heard = set(words(whisper.transcribe(resample(agent_audio, conversation.output_rate, 16000))))
    said = [w for w in words(turn.reply_text) if len(w) > 2]
    matched = [w for w in said if w in heard]
    assert len(matched) >= len(said) / 2, f"TTS said {turn.reply_text!r}, Whisper heard {heard}"

    # Every latency was measured, and voice-to-voice covers the stages inside it.
    m = turn.metrics
    for name in ("endpointing_ms", "stt_final_ms", "llm_first_token_ms", "tts_first_audio_ms", "voice_to_voice_ms"):
        assert getattr(m, name) > 0, name
    assert m.voice_to_voice_ms >= m.stt_final_ms + m.llm_first_token_ms
    # How it was said: the language the STT heard, the speech rate and level the edge measured.
    assert (m.language, m.language_probability) == ("en", pytest.approx(1.0))  # tiny.en hears English only
    assert 1.0 < m.words_per_second < 6.0, m.words_per_second  # espeak-ng at 150 words a minute
    assert -40 < m.level_dbfs < -3, m.level_dbfs


async def test_human_recording_is_transcribed(edge_address):
    recording = np.concatenate([silence(300), read_wav(HUMAN_RECORDING), silence(200)])
    conversation = await converse(edge_address, recording, timeout=90)
    assert conversation.status.name == "OK", conversation.details
    transcript = conversation.replies[0].transcript
    assert "front center" in " ".join(words(transcript)), transcript


async def test_two_turns_keep_the_conversation(edge_address, speech_dir):
    first, second = speak("Hello there.", speech_dir), speak("What is your name?", speech_dir)

    async def speaker(script, send):
        await script.wait_for(lambda: script.turn_done(0))  # the disclosure
        await send(first)
        await script.wait_for(lambda: script.turn_done(1), timeout=90)
        await send(second)
        await script.wait_for(lambda: script.turn_done(2), timeout=90)

    conversation = await LiveMicrophone(edge_pb2.SessionConfig()).run(edge_address, speaker)
    assert [t.index for t in conversation.replies] == [1, 2]
    assert all(t.ended and t.reply_text.strip() for t in conversation.replies)
    assert "name" in words(conversation.turns[2].transcript)


async def test_keys_pressed_are_a_turn_the_agent_answers(edge_address):
    """A phone's keypad (Dtmf) through real processes: one keypad turn, ended by "#", heard
    by the client as its transcript and answered by the LLM."""
    async def caller(mic: LiveMicrophone, send):
        await mic.wait_for(lambda: mic.turn_done(0), timeout=90)
        for key in "42#":
            mic.press(key)
        await mic.wait_for(lambda: mic.turn_done(1), timeout=120)

    conversation = await LiveMicrophone(edge_pb2.SessionConfig()).run(edge_address, caller)
    keypad = conversation.turns[1]
    assert keypad.transcript == "[keypad: 4 2 #]"
    assert keypad.reply_text.strip() and len(keypad.audio) > 0
