"""Voice activity detection stage (Silero VAD v6)."""

from voicestack.bus import Failover, StageContract
from voicestack.v1 import vad_pb2

# A session-long stream: too much audio to replay; the edge reopens and replays the utterance.
CONTRACT = StageContract("vad", vad_pb2.DetectRequest, vad_pb2.DetectResponse, Failover.OPENER)
