"""No voiceprints: no stage returns, and no message carries, a speaker embedding (biometric
data under BIPA and GDPR art. 9). This fails the day a field that could hold one appears in
the contract; the README's Security section says why."""

from __future__ import annotations

import re

import pytest

from voicestack.v1 import audio_pb2, bus_pb2, edge_pb2, llm_pb2, stt_pb2, tools_pb2, tts_pb2, vad_pb2

pytestmark = pytest.mark.fast

SUSPECT_NAMES = re.compile(r"embed|voiceprint|speaker_(vector|id|embedding)|[xd]_?vector|biometric|timbre",
                           re.IGNORECASE)
VECTOR_TYPES = {2, 1}  # FieldDescriptor.TYPE_FLOAT, TYPE_DOUBLE


def messages():
    for module in (audio_pb2, bus_pb2, edge_pb2, llm_pb2, stt_pb2, tools_pb2, tts_pb2, vad_pb2):
        pending = list(module.DESCRIPTOR.message_types_by_name.values())
        while pending:
            message = pending.pop()
            pending += message.nested_types
            yield message


def test_no_field_is_named_or_shaped_like_a_speaker_embedding():
    found = []
    for message in messages():
        for field in message.fields:
            repeated_numbers = field.is_repeated and field.type in VECTOR_TYPES
            if SUSPECT_NAMES.search(field.name) or repeated_numbers:
                found.append(f"{message.full_name}.{field.name}")
    assert not found, f"fields that could carry a voiceprint: {found}"


def test_the_walk_sees_every_stage_response():
    names = {m.full_name for m in messages()}
    for response in ("TranscribeResponse", "DetectResponse", "SynthesizeResponse", "GenerateResponse",
                     "ConverseResponse", "TurnMetrics"):
        assert f"voicestack.v1.{response}" in names
