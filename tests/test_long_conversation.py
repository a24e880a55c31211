"""A long call on the embedded default (real processes, real models, speech at real-time
pace): 20 spoken questions in one Converse call, every one answered.

The edge sends the whole history with every turn and SmolLM2 has 2048 tokens of context;
the session's system prompt (a bakery's price list, ~1550 tokens) and its max_reply_tokens
(150, kept free for the reply) make these 20 short turns outgrow it (from about the 11th),
so the later turns are answered only because the LLM stage drops the oldest turns (issue #20:
turns 7-9 of a 9-turn call used to fail with "Requested tokens (2062) exceed context window").
"""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import speak
from voicestack.client import LiveMicrophone
from voicestack import models
from voicestack.audio import PIPELINE_RATE
from voicestack.llm.engine import trim_history
from voicestack.v1 import audio_pb2, edge_pb2

TURNS = 20
QUESTIONS = [
    "What is two plus three?", "What colour is the sky?", "What is two plus five?",
    "How many days are in a week?", "What is two plus seven?", "What is the capital of France?",
    "What is two plus nine?", "Do you sell rye bread?", "What is two plus eleven?",
    "How many legs does a cat have?",
]
TURN_TIMEOUT_S = 150  # one turn on 2 shared cores: 10-20 s; its first evaluates the long system prompt
CALL_TIMEOUT_S = 1200  # the whole call: 20 turns on 2 shared cores
N_CTX = 2048  # LlamaCppEngine's
MAX_REPLY_TOKENS = 150  # the answers are one short sentence; this is the room kept for one
ITEMS = ["rye loaf", "white loaf", "spelt roll", "seeded bun", "butter croissant", "almond croissant",
         "cinnamon swirl", "apple turnover", "lemon tart", "cheese scone", "sourdough boule", "baguette"]
SYSTEM_PROMPT = "\n".join([
    "You are the voice assistant of the Harbour Street Bakery. Be friendly and answer in one short sentence.",
    "Price list (SKU, item, price in euros, allergens):",
    *(f"SKU {4100 + 37 * i}-{chr(65 + i % 26)}: {ITEMS[i % len(ITEMS)]}, {2 + i % 5}.{i * 17 % 100:02d} EUR, "
      f"allergens {'GMS'[i % 3]}{i % 7}." for i in range(60)),
])


@pytest.fixture(scope="module")
def count_tokens():
    """SmolLM2's tokenizer (the vocabulary alone: no weights loaded)."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(models.smollm2_gguf()), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=False))


async def test_a_20_turn_conversation_answers_every_turn(edge_address, speech_dir, count_tokens):
    assert len(SYSTEM_PROMPT) < 4000  # the edge takes it
    assert 1450 <= count_tokens(SYSTEM_PROMPT) <= 1650
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(TURNS)]
    audio = {q: speak(q, speech_dir) for q in set(questions)}
    took = {}

    async def speaker(script, send):
        await script.wait_for(lambda: script.turn_done(0), timeout=60)  # the disclosure
        for index, question in enumerate(questions, 1):
            started = time.monotonic()
            await send(audio[question])
            try:
                await script.wait_for(lambda: script.turn_done(index) or script.call_ended, timeout=TURN_TIMEOUT_S)
            except AssertionError:
                raise AssertionError(f"turn {index} ({question!r}) not ended within {TURN_TIMEOUT_S} s") from None
            took[index] = time.monotonic() - started
            assert not script.call_ended, f"the call ended at turn {index}: {script.conversation.details}"
            await asyncio.sleep(0.5)  # the agent's last audio has played

    config = edge_pb2.SessionConfig(
        input_format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=PIPELINE_RATE),
        system_prompt=SYSTEM_PROMPT, max_reply_tokens=MAX_REPLY_TOKENS)
    started = time.monotonic()
    conversation = await LiveMicrophone(config).run(edge_address, speaker, timeout=CALL_TIMEOUT_S)
    elapsed = time.monotonic() - started
    print(f"\n{TURNS} turns in {elapsed:.0f} s; per turn, question sent to AgentTurnEnded (s): "
          + " ".join(f"{took[i]:.1f}" for i in sorted(took)) + "; LLM first token (ms): "
          + " ".join(f"{t.metrics.llm_first_token_ms:.0f}" if t.metrics else "-" for t in conversation.replies))

    assert conversation.status.name == "OK", conversation.details
    assert not conversation.errors, [(e.stage, e.message) for e in conversation.errors]
    assert [t.index for t in conversation.replies] == list(range(1, TURNS + 1)), \
        [(t.index, t.transcript) for t in conversation.replies]
    for turn in conversation.replies:
        assert turn.ended and turn.interrupted is None, (turn.index, turn.transcript)
        assert turn.transcript.strip(), f"turn {turn.index}: no transcript"
        assert turn.reply_text.strip(), f"turn {turn.index} ({turn.transcript!r}): the agent said nothing"
        assert len(turn.audio) >= 2 * 24000 // 5, f"turn {turn.index}: under 0.2 s of agent audio"

    # The last turn's request (what the edge sent: the whole history) was over the context:
    # answered only because the stage dropped old turns.
    history = [{"role": "system", "content": SYSTEM_PROMPT}]
    for turn in conversation.replies:
        history += [{"role": "user", "content": turn.transcript}, {"role": "assistant", "content": turn.reply_text}]
    last_request = history[:-1]
    chatml = sum(count_tokens(m["content"]) + 5 for m in last_request) + 3  # SmolLM2's template: 5 a message
    fitted = trim_history(last_request, count_tokens, N_CTX, MAX_REPLY_TOKENS)
    print(f"the last request: {chatml} tokens in {len(last_request)} messages; the stage sent "
          f"{len(fitted.messages)} messages, about {fitted.prompt_tokens} tokens")
    assert chatml + MAX_REPLY_TOKENS > N_CTX, chatml
    assert fitted.dropped > 0
