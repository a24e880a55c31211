"""Text-to-speech stage (Kokoro-82M)."""

from voicestack.bus import Failover, StageContract
from voicestack.v1 import tts_pb2

# The edge resumes a reply at the first clause whose audio it did not fully receive.
CONTRACT = StageContract("tts", tts_pb2.SynthesizeRequest, tts_pb2.SynthesizeResponse, Failover.OPENER)
