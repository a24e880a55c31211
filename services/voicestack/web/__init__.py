"""The WebRTC gateway: a browser talks to the agent (see gateway.py). Run it with
`voicestack serve web` (settings: config.Settings' web_* fields)."""
