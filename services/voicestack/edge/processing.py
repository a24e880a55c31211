"""The conversation's processors (voicestack.processors), run in order on one piece of
text at one place, each timed in the turn's trace.

A processor that raises: fail-open, its input passes on unchanged and the error is
counted (`voicestack_processor_errors_total`); fail-closed, a StageError (stage
"processors", the message naming it) ends the turn with one `Error`.
"""

from __future__ import annotations

import logging

import grpc

from voicestack import telemetry
from voicestack.errors import StageError

log = logging.getLogger(__name__)


class ProcessorChain:
    def __init__(self, processors: list, meters=None):
        self.processors = list(processors)
        self.meters = meters

    def applies(self, place: str) -> bool:
        return any(place in p.applies_to for p in self.processors)

    async def run(self, text: str, place: str, parent_span=None) -> str:
        for processor in self.processors:
            if place not in processor.applies_to:
                continue
            span = telemetry.start_span(f"processor.{processor.name}", parent=parent_span,
                                        voicestack__stage="processors", voicestack__place=place)
            try:
                text = await processor.process(text, place)
            except Exception as error:  # a team's code: any exception is its failure
                reason = f"{type(error).__name__}: {error}"
                span.set_attribute("voicestack.processor.failed", True)
                if processor.fail_closed:
                    raise StageError(grpc.StatusCode.INTERNAL,
                                     f"processor {processor.name!r} failed on the {place} text ({reason})",
                                     "processors") from error
                # (the reason, not the text: the text may be what the processor exists to hide)
                log.warning("processor %r failed on the %s text, passed it on unchanged: %s",
                            processor.name, place, reason)
                if self.meters is not None:
                    self.meters.processor_errors.add(1, {"processor": processor.name, "place": place})
            finally:
                span.end()
        return text

    async def clause(self, text: str, parent_span=None) -> str:
        """One clause of the agent's reply, as the TTS will speak it."""
        return await self.run(text, "agent", parent_span)


NO_PROCESSORS = ProcessorChain([])
