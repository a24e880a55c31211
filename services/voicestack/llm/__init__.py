"""LLM stage (llama.cpp in process, or any OpenAI-compatible server such as vLLM)."""

from voicestack.bus import Failover, StageContract
from voicestack.v1 import llm_pb2

# Seeded sampling: a replayed request gives the same deltas, so those delivered are skipped.
CONTRACT = StageContract("llm", llm_pb2.GenerateRequest, llm_pb2.GenerateResponse, Failover.REPLAY)
# The strong pool: the same stage and messages under its own subjects, Deployment and
# autoscaler (settings.llm_pool = "llm-strong"); the edge's router picks a pool per turn.
STRONG_CONTRACT = StageContract("llm-strong", llm_pb2.GenerateRequest, llm_pb2.GenerateResponse, Failover.REPLAY)
POOLS = {c.name: c for c in (CONTRACT, STRONG_CONTRACT)}
