"""End of turn by model in the VAD stage's VadStream: with a scorer standing in for the
model (the segmenter's logic), then with Smart Turn v3.2 on real recordings."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import HUMAN_RECORDING
from voicestack.audio import PIPELINE_RATE, float_to_pcm16, read_wav
from voicestack.vad.engine import ENDED, EnergyVad, SileroVad, TurnPolicy

RATE = PIPELINE_RATE


def tone(ms: int) -> np.ndarray:
    t = np.arange(RATE * ms // 1000) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def quiet(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, np.float32)


class Scripted:
    """Scores in order; records what it was shown."""

    def __init__(self, *scores: float):
        self.scores = list(scores)
        self.seen: list[np.ndarray] = []

    def score(self, audio: np.ndarray) -> float:
        self.seen.append(audio.copy())
        return self.scores.pop(0)


def run(stream, audio: np.ndarray, chunk_ms: int = 20) -> list:
    pcm = float_to_pcm16(audio)
    step = RATE * chunk_ms // 1000 * 2
    events = []
    for at in range(0, len(pcm), step):
        events += stream.feed(pcm[at: at + step])
    return events + stream.flush()


@pytest.mark.fast
def test_a_confident_score_ends_the_turn_at_the_pause():
    scorer = Scripted(0.9)
    stream = EnergyVad().open(min_silence_ms=2500, min_speech_ms=100, turn=TurnPolicy(scorer, 0.5, 200))
    events = [e for e in run(stream, np.concatenate([quiet(300), tone(1000), quiet(3000)])) if e.type == ENDED]
    assert len(events) == 1
    assert 1300 <= events[0].offset_ms <= 1340  # where the speech ended
    assert 1480 <= events[0].decided_at_ms <= 1560  # at the 200 ms pause, not 2500 ms later
    assert events[0].turn_score == 0.9
    [shown] = scorer.seen  # the utterance, and nothing after the decision point
    assert len(shown) / RATE * 1000 == pytest.approx(1000 + 200 + 200, abs=70)


@pytest.mark.fast
def test_an_unsure_score_waits_for_the_longest_silence_or_for_more_speech():
    scorer = Scripted(0.2, 0.1, 0.95)
    stream = EnergyVad().open(min_silence_ms=2000, min_speech_ms=100, turn=TurnPolicy(scorer, 0.5, 200))
    # speech, a 600 ms pause (unsure: goes on), speech, a long silence (unsure: ends at the wait)
    audio = np.concatenate([quiet(200), tone(800), quiet(600), tone(800), quiet(2500),
                            tone(500), quiet(1000)])  # then a new utterance the model is sure of
    ended = [e for e in run(stream, audio) if e.type == ENDED]
    assert len(ended) == 2
    assert ended[0].decided_at_ms - ended[0].offset_ms == pytest.approx(2000, abs=70)
    assert ended[0].turn_score == 0.1
    assert ended[1].decided_at_ms - ended[1].offset_ms == pytest.approx(200, abs=70)
    assert len(scorer.seen) == 3  # once per pause


@pytest.mark.fast
def test_without_a_policy_the_stream_never_scores():
    stream = EnergyVad().open(min_silence_ms=600, min_speech_ms=100)
    ended = [e for e in run(stream, np.concatenate([quiet(200), tone(800), quiet(1000)])) if e.type == ENDED]
    assert [e.turn_score for e in ended] == [-1.0]
    assert not stream.scores_soon()


@pytest.mark.fast
def test_the_model_sees_at_most_the_last_8_seconds():
    scorer = Scripted(0.9)
    stream = EnergyVad().open(min_silence_ms=2500, min_speech_ms=100, turn=TurnPolicy(scorer, 0.5, 200))
    run(stream, np.concatenate([quiet(200), tone(12000), quiet(1000)]), chunk_ms=100)
    assert len(scorer.seen[0]) == 8 * RATE


@pytest.fixture(scope="module")
def detector():
    from voicestack.vad.turn_model import TurnDetector
    return TurnDetector.load(threads=1)


def test_a_human_recording_ends_at_the_pause_with_the_model(detector):
    """"Front Center", spoken by a person: the model is sure it is complete (0.97 measured),
    so the turn ends at the 200 ms pause, not after the longest wait."""
    recording = read_wav(HUMAN_RECORDING)
    stream = SileroVad().open(min_silence_ms=2500, min_speech_ms=200, turn=TurnPolicy(detector, 0.5, 200))
    ended = [e for e in run(stream, np.concatenate([quiet(300), recording, quiet(3000)])) if e.type == ENDED]
    assert ended and 0.5 <= ended[0].turn_score <= 1.0
    assert ended[0].decided_at_ms - ended[0].offset_ms < 600


# ---------------------------------------------------------------- through the pipeline

@pytest.fixture(scope="module")
def paused_sentence() -> np.ndarray:
    """"I was wondering if ... you could help me with my account.", spoken by Kokoro as one
    sentence (so the first half keeps its unfinished intonation) and cut at that word gap with
    a 500 ms pause put in. Smart Turn scored the cut 0.02-0.08 in load/endpointing.py."""
    from load.endpointing import Speaker, quiet_point

    first, rest = "I was wondering if", "you could help me with my account."
    whole = Speaker()(f"{first} {rest}", 1.0)
    cut = quiet_point(whole, len(first) / len(f"{first} {rest}"))
    return np.concatenate([quiet(300), whole[:cut], quiet(500), whole[cut:]])


@pytest.mark.parametrize("mode, turns", [("model", 1), ("silence 300 ms", 2)])
async def test_a_mid_sentence_pause_is_one_turn_with_the_model_and_two_with_a_short_silence(
        edge_address, paused_sentence, mode, turns):
    from conftest import words
    from voicestack.client import converse
    from voicestack.v1 import edge_pb2

    endpointing = (edge_pb2.EndpointingConfig(mode=edge_pb2.ENDPOINTING_MODE_MODEL) if mode == "model" else
                   edge_pb2.EndpointingConfig(mode=edge_pb2.ENDPOINTING_MODE_SILENCE, silence_ms=300))
    conversation = await converse(edge_address, paused_sentence, config=edge_pb2.SessionConfig(endpointing=endpointing),
                                  expect_turns=turns, timeout=120)
    assert conversation.status.name == "OK", conversation.details
    started = [e for e in conversation.events if e.WhichOneof("kind") == "speech_started"]
    first = conversation.replies[0]
    if mode == "model":
        assert len(started) == 1, [t.transcript for t in conversation.replies]
        assert {"wondering", "account"} <= set(words(first.transcript)), first.transcript
        spans = {s.name: s for s in first.trace.spans} if first.trace else {}
        assert "endpointing" in spans
    else:
        assert len(started) >= 2
        assert "account" not in words(first.transcript), first.transcript
