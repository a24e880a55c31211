"""Text-to-speech stage (Kokoro-82M)."""
