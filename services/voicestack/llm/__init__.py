"""LLM stage (llama.cpp in process, or any OpenAI-compatible server such as vLLM)."""
