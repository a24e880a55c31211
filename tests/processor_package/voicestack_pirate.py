"""A processor from outside voicestack: every clause the agent says ends with "Arr!"."""

from __future__ import annotations


class Pirate:
    name = "pirate"
    applies_to = frozenset({"agent"})
    fail_closed = False

    def __init__(self, settings):
        self.settings = settings

    async def process(self, text: str, place: str) -> str:
        return f"{text.rstrip()} Arr!"
