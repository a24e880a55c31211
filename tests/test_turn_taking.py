"""Turn-taking on real processes and real models, audio at real-time pace:
barge-in, noise that must not interrupt, long monologues, the disclosure, and
speculative replies."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from conftest import metric, silence, speak, words
from voicestack.audio import PIPELINE_RATE
from voicestack.client import LiveMicrophone
from voicestack.v1 import audio_pb2, edge_pb2

STORY_PROMPT = "You are a storyteller. Always answer with a very long story of at least twenty sentences."


def session_config(**kwargs) -> edge_pb2.SessionConfig:
    config = edge_pb2.SessionConfig(
        input_format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=PIPELINE_RATE))
    config.MergeFrom(edge_pb2.SessionConfig(**kwargs))
    return config


async def test_disclosure_is_the_first_thing_heard(edge_address, speech_dir):
    async def speaker(script, send):
        await script.wait_for(lambda: script.turn_done(0))

    conversation = await LiveMicrophone(session_config()).run(edge_address, speaker)
    first_audio = next(e for e in conversation.events if e.WhichOneof("kind") == "agent_audio")
    assert first_audio.agent_audio.turn_index == 0
    assert conversation.opening.reply_text.strip() == "You are talking to an AI assistant."
    assert conversation.opening.ended and len(conversation.opening.audio) > 24000  # > 0.5 s


async def test_barge_in_cuts_the_reply_and_the_history(stack, edge_address, speech_dir):
    llm_port, tts_port = stack.processes["llm"].metrics_port, stack.processes["tts"].metrics_port
    cancelled_before = (metric(llm_port, "voicestack_streams_cancelled_total"),
                        metric(tts_port, "voicestack_streams_cancelled_total"))
    generations_before = metric(llm_port, "voicestack_stage_latency_seconds_count", kind="generation")
    question = speak("Tell me a story about a brave dragon.", speech_dir)
    interruption = speak("Stop, stop, I have another question.", speech_dir)

    async def speaker(script, send):
        await script.wait_for(lambda: script.turn_done(0))
        await send(question)
        await script.wait_for(lambda: 1 in script.first_audio)
        await asyncio.sleep(0.5)  # let the agent talk a little (its LLM still writing), then talk over it
        await send(interruption)
        await script.wait_for(lambda: 2 in script.first_audio, timeout=90)  # the agent answers it

    script = LiveMicrophone(session_config(system_prompt=STORY_PROMPT, max_reply_tokens=1000))
    conversation = await script.run(edge_address, speaker)

    first, second = conversation.turns[1], conversation.turns[2]
    assert first.interrupted is not None, "the agent was not interrupted"
    assert script.audio_after_interrupt <= 1, "agent audio kept coming after the interruption"
    heard = first.interrupted.heard_text
    assert heard and len(words(heard)) < len(words(first.reply_text)), (heard, first.reply_text)
    assert words(first.reply_text)[: len(words(heard))] == words(heard)
    assert 500 <= first.interrupted.played_ms <= len(first.audio) / 2 / 24 + 50
    assert "question" in words(second.transcript) and second.reply_text
    assert first.interrupted.barge_in_reaction_ms > 0
    # The stages stopped their work, not only the edge its forwarding. SmolLM2 sometimes ends
    # its story before the interruption lands (about 2 s of writing): then both replies'
    # generations ended normally and the LLM had nothing left to cancel.
    llm_cancelled = metric(llm_port, "voicestack_streams_cancelled_total") > cancelled_before[0]
    generations = metric(llm_port, "voicestack_stage_latency_seconds_count", kind="generation") - generations_before
    assert llm_cancelled or generations >= 2, f"LLM: no stream cancelled, {generations:.0f} generations ended"
    assert metric(tts_port, "voicestack_streams_cancelled_total") > cancelled_before[1]


async def test_a_short_noise_does_not_interrupt(edge_address, speech_dir):
    question = speak("Tell me a story about a cat.", speech_dir)
    burst = speak("Ha", speech_dir)[: PIPELINE_RATE * 150 // 1000]  # 150 ms of voice: a cough
    burst = burst * (0.5 / max(1e-6, np.abs(burst).max()))

    async def speaker(script, send):
        await script.wait_for(lambda: script.turn_done(0))
        await send(question)
        await script.wait_for(lambda: 1 in script.first_audio)
        await asyncio.sleep(1.0)
        await send(burst)
        await script.wait_for(lambda: script.turn_done(1), timeout=90)

    script = LiveMicrophone(session_config(system_prompt=STORY_PROMPT, max_reply_tokens=60))
    conversation = await script.run(edge_address, speaker)
    assert conversation.turns[1].interrupted is None
    assert conversation.turns[1].ended
    assert 2 not in conversation.turns or not conversation.turns[2].reply_text


async def test_a_long_utterance_is_split_into_turns(edge_address, speech_dir):
    monologue = speak("I went to the market this morning and I bought apples, pears, bread, "
                      "cheese, milk, eggs and a big bag of oranges for my family.", speech_dir)
    assert monologue.size / PIPELINE_RATE > 4.0

    async def speaker(script, send):
        await script.wait_for(lambda: script.turn_done(0))
        await send(monologue)
        await script.wait_for(lambda: any(t.ended and t.reply_text for t in script.conversation.replies), timeout=90)

    config = session_config(endpointing=edge_pb2.EndpointingConfig(max_utterance_ms=2000))
    conversation = await LiveMicrophone(config).run(edge_address, speaker)
    ended = [e.speech_ended.turn_index for e in conversation.events if e.WhichOneof("kind") == "speech_ended"]
    finals = [t for t in conversation.replies if t.transcript]
    assert len(ended) >= 2 and len(finals) >= 2, (ended, [t.transcript for t in finals])
    replied = [t for t in conversation.replies if t.reply_text]
    assert len(replied) == 1 and replied[0].index == max(ended), "one answer, after the last part"


@pytest.mark.parametrize("pause_ms, expect", [(0, "hit"), (600, "miss")])
async def test_speculative_replies(edge_address, speech_dir, pause_ms, expect):
    first = speak("What is the capital", speech_dir)
    second = speak("of France?", speech_dir)
    audio = np.concatenate([first, silence(pause_ms), second]) if pause_ms else np.concatenate([first, second])

    async def speaker(script, send):
        await script.wait_for(lambda: script.turn_done(0))
        await send(audio)
        await script.wait_for(lambda: any(t.ended and t.reply_text for t in script.conversation.replies), timeout=90)

    # 2 s of end-of-turn silence: on 2 cores the speculative decode queues behind the STT
    # stage's own pause decode, and must be done before the turn ends to count as a hit.
    config = session_config(endpointing=edge_pb2.EndpointingConfig(
        silence_ms=2000 if expect == "hit" else 1000, speculation=edge_pb2.SPECULATION_MODE_ON,
        speculative_pause_ms=250))
    # A hit needs the transcript at the pause to equal the final one; tiny.en on a loaded
    # 2-core machine sometimes hears the same audio two ways, so a hit gets two tries.
    for attempt in range(2 if expect == "hit" else 1):
        conversation = await LiveMicrophone(config).run(edge_address, speaker)
        turn = [t for t in conversation.replies if t.ended and t.reply_text][-1]
        if expect == "miss" or turn.metrics.speculative_hit:
            break
    if expect == "hit":
        assert turn.metrics.speculative_hit and turn.metrics.speculative_hits >= 1, turn.metrics
    else:
        assert turn.metrics.speculative_misses >= 1, turn.metrics
    assert turn.reply_text.strip()
