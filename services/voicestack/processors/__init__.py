"""Processors: a team's own logic on the conversation's text path.

    the user's transcript  -> processors ("user")        -> the LLM
    the LLM's text         -> processors ("agent")       -> the TTS (clause by clause)
    a tool call / result   -> processors ("tool_call" / "tool_result") -> run / the LLM
    anything recorded      -> redactors ("record")       -> logs, traces, recordings

A processor is an object with a `name`, the places it `applies_to`, whether it fails
closed, and `async process(text, place) -> text`. The edge hands it whole pieces: a final
transcript, or one clause of the agent's reply (the clause is the look-ahead: a card number
or an email is never split across two calls). It returns the text to pass on, changed or
not. Raising fails it: a fail-open processor's input passes on unchanged (and an error is
counted); a fail-closed one ends the turn with one `Error` naming it.

Processors are found by name among the `voicestack.processors` entry points, so a team
ships its own in its own package:

    [project.entry-points."voicestack.processors"]
    shout = "my_package.shout:Shout"      # Shout(settings) -> a Processor

and turns it on with the edge setting `processors=pii,shout` (Helm: `edge.processors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

ENTRY_POINT_GROUP = "voicestack.processors"
PLACES = frozenset({"user", "agent", "tool_call", "tool_result", "record"})


class Processor(Protocol):
    name: str
    applies_to: frozenset[str]  # a subset of PLACES
    fail_closed: bool

    async def process(self, text: str, place: str) -> str: ...


@dataclass
class ProcessorFailed(Exception):
    """A fail-closed processor raised: the turn ends with an Error naming it."""

    processor: str
    place: str
    reason: str

    def __str__(self) -> str:
        return f"processor {self.processor!r} failed on the {self.place} text: {self.reason}"


class UnknownProcessor(ValueError):
    pass


def load(names: str, settings) -> list[Processor]:
    """The processors named (comma-separated), in that order, built from their entry points."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    processors = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in found:
            known = ", ".join(sorted(found)) or "none installed"
            raise UnknownProcessor(f"processor {name!r} is not installed (entry point group "
                                   f"{ENTRY_POINT_GROUP!r}; installed: {known})")
        processor = found[name].load()(settings)
        wrong = set(processor.applies_to) - PLACES
        if wrong:
            raise UnknownProcessor(f"processor {name!r} applies to unknown places {sorted(wrong)}; "
                                   f"use {sorted(PLACES)}")
        processors.append(processor)
    return processors
