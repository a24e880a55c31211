"""Content filter (processor "content_filter"): a clause of the agent's reply that holds a
listed word or phrase is not spoken; `settings.content_filter_text` is, instead.

    content_filter = "voicestack.processors.content_filter:ContentFilter"   # entry point

- Places: "agent" only (each call is one clause, as the TTS will speak it).
- Fails closed: if the check raises (a bad extra list, a judge that errors), the turn ends
  with an Error naming "content_filter" rather than speaking an unchecked clause.
- Lists: small built-in English, French and German lists (`WORDS`) of clearly unsafe words
  and phrases (strong profanity, slurs, sexual terms, self-harm and violent incitement),
  all applied to every clause, whatever language the agent answers in. Entries that are
  harmless in another language the agent may speak are left out (French "con", "bite";
  "negro", Spanish/Portuguese for black; English "chink", "fag"). `settings.content_filter_words_file` adds entries: one a line, UTF-8, blank
  lines and lines starting with "#" skipped.
- Matching: whole words, case-insensitive (Unicode casefold, NFKC, curly apostrophes made
  straight), a phrase's words separated by any spaces, so "Scunthorpe" and "assassin" pass.
  An entry ending in "*" matches words starting with it ("fuck*": "fucking", "fucker").
- An LLM check: pass `judge`, an async callable taking the clause and returning True when
  it must not be spoken. It runs only on clauses the lists pass. None is shipped (no
  network here); a team wires its own in a subclass or factory:
      ContentFilter(settings, judge=my_moderation_call)
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Awaitable, Callable, Iterable

DEFAULT_TEXT = "Sorry, I can't say that."

# Built-in lists. Kept short and unambiguous: the point is "never say this", not a
# complete moderation policy (use the extra list file, or a judge, for that).
WORDS: dict[str, tuple[str, ...]] = {
    "en": (
        "fuck*", "motherfuck*", "shit", "shits", "shitty", "bullshit", "cunt*", "cocksucker*",
        "asshole*", "bitch", "bitches", "dickhead*", "wanker*", "twat*",
        "slut*", "whore*", "dildo*", "blowjob*", "handjob*", "porn*",
        "nigger*", "nigga*", "faggot*", "retard", "retards", "retarded",
        "spic", "spics", "kike", "kikes", "tranny", "trannies",
        "kill yourself", "kill yourselves", "go kill yourself", "kys", "hang yourself",
        "slit your wrists", "i will kill you", "i'm going to kill you", "heil hitler",
        "white power", "sieg heil",
    ),
    "fr": (
        "putain", "putains", "merde", "connard*", "connasse*", "salope*", "salaud*",
        "enculé*", "encule*", "enculer", "nique ta mère", "nique ta mere", "ta gueule",
        "fils de pute", "pute", "putes", "chatte", "pédé*",
        "négro*", "bougnoule*", "youpin*", "bicot*", "pétasse*",
        "tue-toi", "tue toi", "va te pendre", "suicide-toi", "je vais te tuer",
    ),
    "de": (
        "scheiße", "scheisse", "scheiß", "scheiss", "fotze*", "wichser*", "hurensohn*",
        "hure", "huren", "arschloch*", "fick dich", "fick deine mutter", "ficken", "fickt",
        "schlampe*", "missgeburt*", "spast", "spasti", "spasten", "schwuchtel*", "kanake*",
        "neger*", "bring dich um", "häng dich auf", "ich bring dich um", "ich werde dich töten",
        "sieg heil", "heil hitler",
    ),
}

Judge = Callable[[str], Awaitable[bool]]


def _normal(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return text.replace("\u2019", "'").replace("\u2018", "'").casefold()


def read_words_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def compile_words(entries: Iterable[str]) -> re.Pattern | None:
    """One regex: any entry, as whole words ("x*" a prefix), case-insensitive."""
    alternatives = set()
    for entry in entries:
        entry = _normal(entry.strip())
        if not entry:
            continue
        prefix = entry.endswith("*")
        words = entry.rstrip("*").split()
        if not words:
            continue
        body = r"\s+".join(re.escape(w) for w in words)
        alternatives.add(body + (r"[\w'-]*" if prefix else ""))
    if not alternatives:
        return None
    # Longest first, so a phrase wins over a word it starts with; (?<!\w) / (?!\w): whole words.
    ordered = sorted(alternatives, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(ordered) + r")(?!\w)", re.UNICODE)


class ContentFilter:
    """Processor "content_filter": see the module's docstring."""

    name = "content_filter"
    applies_to = frozenset({"agent"})
    fail_closed = True

    def __init__(self, settings, judge: Judge | None = None,
                 languages: Iterable[str] | None = None):
        entries = [w for lang in (languages or WORDS) for w in WORDS.get(lang, ())]
        extra = getattr(settings, "content_filter_words_file", "") or ""
        if extra:
            entries += read_words_file(extra)  # a missing file fails at start, loudly
        self.pattern = compile_words(entries)
        self.replacement = getattr(settings, "content_filter_text", "") or DEFAULT_TEXT
        self.judge = judge

    def matches(self, text: str) -> bool:
        return self.pattern is not None and self.pattern.search(_normal(text)) is not None

    async def process(self, text: str, place: str) -> str:
        if not text.strip():
            return text
        if self.matches(text):  # a regex over one clause: microseconds, on the loop
            return self.replacement
        if self.judge is not None and await self.judge(text):
            return self.replacement
        return text
