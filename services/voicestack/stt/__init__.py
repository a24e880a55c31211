"""Speech-to-text stage (faster-whisper)."""
