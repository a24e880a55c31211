"""Which LLM pool answers a turn: `llm` (fast, the default) or `llm-strong`.

Decided per turn by the session, from what it already knows, in this order:
  1. the client's hint (SessionConfig.llm_route): the client knows its use case;
  2. the turn likely needs a tool: a small model picks tools poorly (BENCHMARKS.md);
  3. a long request, or one that asks for reasoning (why, explain, compare...);
  4. a deep conversation, where a small model loses the thread;
otherwise the fast pool. The choice and its reason go into TurnMetrics and the trace.
No classifier model is used: none small enough ships offline on PyPI that we found;
the rules are cheap (microseconds) and their reasons are readable in a trace.

A deployment without an `llm-strong` pool loses nothing: generation falls back to the
fast pool when the strong one has no replica, and says so in the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from voicestack import llm
from voicestack.bus import StageContract
from voicestack.v1 import edge_pb2

LONG_REQUEST_WORDS = 25
DEEP_HISTORY_MESSAGES = 24
_REASONING = re.compile(r"\b(why|explain|compare|difference|reason|plan|step by step|calculate|how does|how do)\b",
                        re.IGNORECASE)
_WORD = re.compile(r"[a-z]{4,}")
# Words too common to say that a request is about a tool.
_COMMON = {"what", "when", "where", "which", "tell", "give", "please", "with", "from", "that", "this", "your",
           "current", "about", "have", "does", "there", "would", "could", "should", "some", "like", "just"}


@dataclass(frozen=True)
class Route:
    contract: StageContract
    reason: str

    @property
    def pool(self) -> str:
        return self.contract.name


def tool_words(definitions) -> set[str]:
    """Words of the tools' names and descriptions that would show a request is about one."""
    words: set[str] = set()
    for definition in definitions:
        text = f"{definition.name.replace('_', ' ')} {definition.description}".lower()
        words |= {w for w in _WORD.findall(text) if w not in _COMMON}
    return words


def choose_route(user_text: str, *, hint: int = edge_pb2.LLM_ROUTE_UNSPECIFIED, tool_vocabulary: set[str] = frozenset(),
                 history_messages: int = 0) -> Route:
    if hint == edge_pb2.LLM_ROUTE_FAST:
        return Route(llm.CONTRACT, "client asked for the fast pool")
    if hint == edge_pb2.LLM_ROUTE_STRONG:
        return Route(llm.STRONG_CONTRACT, "client asked for the strong pool")
    words = user_text.lower().split()
    matched = sorted({w.strip(".,?!'\"") for w in words} & tool_vocabulary)
    if matched:
        return Route(llm.STRONG_CONTRACT, f"likely needs a tool (mentions {', '.join(matched[:3])})")
    if len(words) > LONG_REQUEST_WORDS:
        return Route(llm.STRONG_CONTRACT, f"long request ({len(words)} words)")
    if (match := _REASONING.search(user_text)) is not None:
        return Route(llm.STRONG_CONTRACT, f"asks for reasoning ({match.group(0).lower()!r})")
    if history_messages > DEEP_HISTORY_MESSAGES:
        return Route(llm.STRONG_CONTRACT, f"deep conversation ({history_messages} messages)")
    return Route(llm.CONTRACT, "short request")
