"""LLM stage (llama.cpp in process, or any OpenAI-compatible server such as vLLM)."""

from voicestack.bus import Failover, StageContract
from voicestack.v1 import llm_pb2

# Seeded sampling: a replayed request gives the same deltas, so those delivered are skipped.
CONTRACT = StageContract("llm", llm_pb2.GenerateRequest, llm_pb2.GenerateResponse, Failover.REPLAY)
