"""More than English, on real processes and real models: with the multilingual STT
(stt_model=base, Whisper base from PyPI), a question asked in French is transcribed,
answered in French and spoken with Kokoro's French voice; one asked in German likewise,
read by the stand-in voice (Kokoro has no German one).

The questions are spoken by the TTS stage itself, through its own API (French in its
French voice). What the agent said is checked by ear: its audio goes back through the STT
stage, which must hear the same language."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from conftest import words
from voicestack.audio import PIPELINE_RATE, float_to_pcm16, pcm16_to_float, resample
from voicestack.client import converse, silence
from voicestack.launcher import START_ORDER, Stack
from voicestack.v1 import audio_pb2, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc

TTS_RATE = 24000
# Words that only a reply in that language would hold (SmolLM2-135M's French and German
# are poor, but they are French and German).
FUNCTION_WORDS = {"fr": {"le", "la", "les", "est", "des", "une", "et", "du", "de", "en", "je", "vous", "il"},
                  "de": {"der", "die", "das", "ist", "und", "ein", "eine", "ich", "sie", "es", "nicht", "in"}}


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory):
    with Stack(ports="free", log_dir=tmp_path_factory.mktemp("logs-multilingual"),
               env={"VOICESTACK_STT_MODEL": "base"}) as running:
        running.start(START_ORDER)
        yield running


async def spoken(stack, text: str, language: str) -> np.ndarray:
    """`text` said by the TTS stage in `language` (its voice for it), at 16 kHz."""
    async def requests():
        yield tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(language=language))
        yield tts_pb2.SynthesizeRequest(text=text)

    async with grpc.aio.insecure_channel(stack.processes["tts"].address) as channel:
        pcm = b"".join([r.audio.pcm async for r in tts_pb2_grpc.TtsServiceStub(channel).Synthesize(requests())])
    return resample(pcm16_to_float(pcm), TTS_RATE, PIPELINE_RATE)


async def transcribed(stack, audio: np.ndarray) -> stt_pb2.TranscribeResponse:
    """The STT stage's final transcript of `audio` (16 kHz), language detected."""
    pcm = float_to_pcm16(audio)

    async def requests():
        yield stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig())
        for offset in range(0, len(pcm), 32000):
            yield stt_pb2.TranscribeRequest(audio=audio_pb2.AudioChunk(pcm=pcm[offset: offset + 32000]))

    async with grpc.aio.insecure_channel(stack.processes["stt"].address) as channel:
        responses = [r async for r in stt_pb2_grpc.SttServiceStub(channel).Transcribe(requests())]
    return responses[-1]


@pytest.mark.parametrize("language, question, expected", [
    # (whole sentences: Whisper base needs a few words to be sure of the language)
    ("fr", "Bonjour, je voudrais savoir quelle est la capitale de l'Italie, s'il vous plaît.", {"capitale", "savoir"}),
    ("de", "Guten Tag, ich möchte wissen, wie das Wetter heute in Berlin ist.", {"wissen", "berlin"}),
])
async def test_a_question_in_another_language_is_answered_in_it(multilingual, language, question, expected):
    audio = await spoken(multilingual, question, language)
    conversation = await converse(multilingual.processes["edge"].address,
                                  np.concatenate([silence(300), audio]), timeout=180)
    heard = [t for t in conversation.replies if t.transcript]
    assert len(heard) == 1, [t.transcript for t in heard]  # one turn (a pause at a comma is not its end)
    turn = heard[0]
    assert expected <= set(words(turn.transcript)), turn.transcript
    assert turn.metrics.language == language and turn.metrics.language_probability >= 0.5
    assert FUNCTION_WORDS[language] & set(words(turn.reply_text)), f"not {language}: {turn.reply_text!r}"
    reply_audio = resample(pcm16_to_float(bytes(turn.audio)), TTS_RATE, PIPELINE_RATE)
    assert reply_audio.size > PIPELINE_RATE // 2
    back = await transcribed(multilingual, reply_audio)
    assert back.language == language, (back.language, back.text, turn.reply_text)


async def test_an_english_only_model_refuses_another_language_clearly(stack):
    """The default STT (tiny.en) is asked for French: INVALID_ARGUMENT naming the way out."""
    async def requests():
        yield stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(language="fr-FR"))

    async with grpc.aio.insecure_channel(stack.processes["stt"].address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            [r async for r in stt_pb2_grpc.SttServiceStub(channel).Transcribe(requests())]
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stt_model=base" in failure.value.details()
