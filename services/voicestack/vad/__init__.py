"""Voice activity detection stage (Silero VAD v6)."""
