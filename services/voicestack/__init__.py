"""voicestack: a self-hosted voice-agent stack of gRPC streaming services over NATS."""

__version__ = "0.1.0"
