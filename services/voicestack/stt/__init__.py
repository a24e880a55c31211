"""Speech-to-text stage (faster-whisper)."""

from voicestack.bus import Failover, StageContract
from voicestack.v1 import stt_pb2

# Transcripts are snapshots whose number depends on timing: after a failover take them all again.
CONTRACT = StageContract("stt", stt_pb2.TranscribeRequest, stt_pb2.TranscribeResponse, Failover.RESEND)
