"""Kokoro-82M text-to-speech engine (int8 ONNX, onnxruntime).

The embedded default voice: everything comes from PyPI and runs offline on CPU.
Text goes through espeak-ng (IPA with stress and punctuation, in the text's language:
English unless told), the phonemes become Kokoro token ids, and the model turns them
into 24 kHz audio with a voice's style vectors.

The interface is deliberately narrow (sample_rate, voices(), default_voice,
synthesize()) so that a GPU engine can replace this one without the server
noticing. The engine does no timing and knows nothing about gRPC or NATS.

Also here, as pure logic load/baseline.py reuses: `split_clauses`, how the stage cuts
streamed text into clauses to speak. `SilentTts` is the benchmarks-only stand-in
(settings.cheap_engines); `build_engine(settings)` picks the engine.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np

from voicestack import models
from voicestack.config import Settings, cpu_share

# The model's context is 512 tokens; two of them are the padding ids around a chunk.
MAX_TOKENS = 510
# Where a phoneme string may be cut without cutting a word: after punctuation first.
_PHONEME_BREAK = re.compile(r"(?<=[.!?;:,—…])\s+")
# Where streamed text is ready to speak: a sentence end, or a comma/semicolon/colon once
# the clause is long enough to sound natural on its own.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:]\s")
MIN_CLAUSE_WORDS = 4
# The reply's first unit is what the caller waits for (Kokoro's time grows with the text):
# it ends at the first natural break, a comma after a word ("Sure, ..."), or, in a long
# first sentence, before a word or bracket that starts a new phrase once FIRST_UNIT_WORDS
# are written ("Paris is the capital of France | and its largest city."); with no such
# break, at FIRST_UNIT_MAX_WORDS words ("The moon is about three hundred and | eighty...").
FIRST_CLAUSE_WORDS = 1
FIRST_UNIT_WORDS = 6
FIRST_UNIT_MAX_WORDS = 10
_IN_A_NUMBER = re.compile(r"^(?:hundred|thousand|million|billion|\d[\d,.]*)$", re.IGNORECASE)  # "... hundred and eighty"
_PHRASE_START = re.compile(r"\s(?=(?:(?:and|but|so|because|which|who|where|when|while|although|or)\s|[(\[—–]))",
                           re.IGNORECASE)
# A sentence end with nothing after it yet is complete, unless it may go on: "Dr." "3." "e.g."
_SENTENCE_END_AT_END = re.compile(r"[.!?]+[\"')\]]*$")
_NOT_AN_END = re.compile(r"(?:\b(?:mr|mrs|ms|dr|st|vs|etc|e\.g|i\.e|no|approx)|\d|\b[a-z])\.$", re.IGNORECASE)
SECONDS_PER_CHAR = 0.065  # SilentTts: about how fast Kokoro speaks English text

# espeak-ng output, rewritten for symbols Kokoro's vocab lacks (as Kokoro's own
# espeak front end does); anything else unknown is dropped.
_SUBSTITUTIONS = (("ʲ", "j"), ("r", "ɹ"), ("x", "k"), ("ɬ", "l"))
_ENGLISH_ONLY = (("r", "ɹ"),)  # English r is ɹ; French, Spanish... keep their r
# The languages spoken: espeak-ng's name for it and, where Kokoro ships one (kokoro_voices_dir),
# the voice native to it. Kokoro has no German voice: of eight tried, the Italian if_sara
# reads German phonemes best (Whisper base heard it as German, nearly word for word).
LANGUAGES = {"en": ("en-us", ""), "fr": ("fr-fr", "ff_siwis"), "es": ("es", "ef_dora"), "it": ("it", "if_sara"),
             "pt": ("pt-br", "pf_dora"), "hi": ("hi", "hf_alpha"), "de": ("de", "if_sara")}


def split_clauses(text: str, final: bool = False, clauses: bool = True,
                  first: bool = False) -> tuple[list[str], str]:
    """Clauses (or, with clauses=False, sentences) ready to speak, and the rest still being
    written. `first`: nothing of the reply is spoken yet, so its first unit ends at the
    first natural break (FIRST_CLAUSE_WORDS, FIRST_UNIT_WORDS)."""
    ready = []
    while True:
        opening = first and not ready
        match = _SENTENCE_END.search(text)
        clause = _CLAUSE_END.search(text) if clauses else None
        least = FIRST_CLAUSE_WORDS if opening else MIN_CLAUSE_WORDS
        if clause and (not match or clause.start() < match.start()) and len(text[: clause.end()].split()) >= least:
            match = clause
        if opening and clauses and (phrase := _phrase_break(text)) and (not match or phrase.start() < match.start()):
            match = phrase
        if not match and not final and (end := _SENTENCE_END_AT_END.search(text.rstrip())) \
                and not _NOT_AN_END.search(text.rstrip()[: end.start() + 1]):
            match = end  # "France." with nothing after it yet: complete now, not at the next token
        if not match:
            break
        head, text = text[: match.end()].strip(), text[match.end():]
        if head:
            ready.append(head)
    if final and text.strip():
        ready.append(text.strip())
        text = ""
    return ready, text


def _phrase_break(text: str):
    """In a first sentence written this far without a break: the space before a word that
    starts a new phrase, once FIRST_UNIT_WORDS words come before it; else the space after
    FIRST_UNIT_MAX_WORDS whole words."""
    for match in _PHRASE_START.finditer(text):
        before = text[: match.start()].split()
        if len(before) >= FIRST_UNIT_WORDS and not _IN_A_NUMBER.search(before[-1]):
            return match
    spaces = list(re.finditer(r"\s+", text.lstrip()))
    if len(spaces) >= FIRST_UNIT_MAX_WORDS:  # FIRST_UNIT_MAX_WORDS words, each ended by a space
        offset = len(text) - len(text.lstrip())
        return re.compile(r"\s+").search(text, offset + spaces[FIRST_UNIT_MAX_WORDS - 1].start())
    return None


def _load_phonemizer(espeak_language: str = "en-us"):
    """espeak-ng via phonemizer, using the library espeakng-loader ships.

    Pointing phonemizer at espeakng-loader's copy (library and data) means the
    result does not depend on which espeak-ng the host happens to have.
    """
    try:
        import espeakng_loader
        from phonemizer.backend import EspeakBackend
        from phonemizer.backend.espeak.wrapper import EspeakWrapper
    except ImportError as exc:
        raise models.ModelNotFound(
            f"Kokoro's English front end needs {exc.name}: pip install espeakng-loader phonemizer"
        ) from exc
    EspeakWrapper.set_library(espeakng_loader.get_library_path())
    EspeakWrapper.set_data_path(espeakng_loader.get_data_path())
    return EspeakBackend(espeak_language, preserve_punctuation=True, with_stress=True, language_switch="remove-flags")


def _session(device: str, threads: int):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise models.ModelNotFound("the TTS engine needs onnxruntime: pip install onnxruntime") from exc
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                "device='cuda' but onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # 0: onnxruntime picks (all cores)
    return ort.InferenceSession(str(models.kokoro_onnx()), sess_options=opts, providers=providers)


def _chunks(tokens_of, phonemes: str) -> list[list[int]]:
    """Token chunks of at most MAX_TOKENS, cut at clause ends, else at spaces."""
    pieces = []
    for clause in _PHONEME_BREAK.split(phonemes):
        if len(tokens_of(clause)) <= MAX_TOKENS:
            pieces.append(clause)
        else:
            pieces.extend(clause.split(" "))  # a clause too long to say in one breath
    chunks, current = [], []
    for piece in pieces:
        ids = tokens_of(piece)
        space = tokens_of(" ") if current else []
        if current and len(current) + len(space) + len(ids) > MAX_TOKENS:
            chunks.append(current)
            current, space = [], []
        current = current + space + ids
        while len(current) > MAX_TOKENS:  # one "word" longer than the context: cut it
            chunks.append(current[:MAX_TOKENS])
            current = current[MAX_TOKENS:]
    if current:
        chunks.append(current)
    return chunks


class KokoroEngine:
    sample_rate = 24000
    default_voice = "jm_kumo"  # the male Japanese voice reads English phonemes intelligibly

    def __init__(self, device: str = "cpu", threads: int = 0):
        self._session = _session(device, threads)
        data = models.kokoro_data()
        self._vocab: dict[str, int] = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        # (510, 1, 256): one style vector per utterance length in tokens
        voices_dir = models.kokoro_voices_dir()
        self._voices = {path.stem: np.fromfile(path, "<f4").reshape(-1, 256)
                        for path in sorted(voices_dir.glob("*.bin"))} if voices_dir.is_dir() else {}
        with np.load(data / "voices_ja.npz") as npz:
            self._voices.update({name: npz[name].reshape(-1, 256).astype(np.float32) for name in npz.files})
        self._phonemizers = {"en": _load_phonemizer()}
        # espeak-ng is one C library with global state: one caller at a time.
        self._phonemizer_lock = threading.Lock()

    def voices(self) -> list[str]:
        return sorted(self._voices)

    def languages(self) -> list[str]:
        return sorted(LANGUAGES)

    def voice_for(self, language: str) -> str:
        """The voice native to `language` if it is here, else the default voice."""
        native = LANGUAGES.get(language, ("", ""))[1]
        return native if native in self._voices else self.default_voice

    def phonemize(self, text: str, language: str = "en") -> str:
        if language not in LANGUAGES:
            raise ValueError(f"language {language!r} is not spoken; one of {', '.join(self.languages())}")
        with self._phonemizer_lock:
            if language not in self._phonemizers:
                self._phonemizers[language] = _load_phonemizer(LANGUAGES[language][0])
            phonemes = self._phonemizers[language].phonemize([text], strip=True)[0]
        for old, new in _SUBSTITUTIONS:
            if language == "en" or (old, new) not in _ENGLISH_ONLY:
                phonemes = phonemes.replace(old, new)
        return phonemes

    def _tokens(self, phonemes: str) -> list[int]:
        return [self._vocab[p] for p in phonemes if p in self._vocab]

    def synthesize(self, text: str, voice: str = "", speed: float = 1.0, language: str = "en") -> np.ndarray:
        """int16 mono PCM at sample_rate; empty for text with nothing to say. `language`
        (one of LANGUAGES) is the text's: it picks the phonemes, not the voice."""
        voice = voice or self.default_voice
        if voice not in self._voices:
            raise ValueError(f"unknown voice {voice!r}; available: {', '.join(self.voices())}")
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed}")
        if not text.strip():
            return np.zeros(0, np.int16)
        styles = self._voices[voice]
        audio = []
        for tokens in _chunks(self._tokens, self.phonemize(text, language)):
            # the voice pack holds a style per length: pick the one for this chunk
            style = styles[min(len(tokens), len(styles)) - 1].reshape(1, 256)
            out = self._session.run(None, {
                "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                "style": style,
                "speed": np.array([speed], dtype=np.float32),
            })[0]
            audio.append(np.asarray(out, np.float32).ravel())
        if not audio:
            return np.zeros(0, np.int16)
        return (np.clip(np.concatenate(audio), -1.0, 1.0) * 32767).astype(np.int16)


class SilentTts:
    """BENCHMARKS ONLY (cheap_engines): KokoroEngine's interface; silence as long as the text
    would take to say. It measures the edge and the bus, never whether anything is spoken."""

    sample_rate = 24000
    default_voice = "silence"

    def voices(self) -> list[str]:
        return [self.default_voice]

    def languages(self) -> list[str]:
        return sorted(LANGUAGES)

    def voice_for(self, language: str) -> str:
        return self.default_voice

    def synthesize(self, text: str, voice: str = "", speed: float = 1.0, language: str = "en") -> np.ndarray:
        if language not in LANGUAGES:
            raise ValueError(f"language {language!r} is not spoken; one of {', '.join(self.languages())}")
        voice = voice or self.default_voice
        if voice not in self.voices():
            raise ValueError(f"unknown voice {voice!r}; available: {', '.join(self.voices())}")
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed}")
        seconds = len(text.strip()) * SECONDS_PER_CHAR / speed
        return np.zeros(int(seconds * self.sample_rate), np.int16)


def build_engine(settings: Settings) -> KokoroEngine | SilentTts:
    if settings.cheap_engines:
        return SilentTts()
    # onnxruntime's default pool is one thread per core of the node, not of the pod's CPU limit.
    engine = KokoroEngine(device=settings.device, threads=settings.threads or cpu_share())
    # One synthesis before the replica takes streams: onnxruntime's first run allocates and
    # plans (seconds on a small CPU), and a stream failed over to a cold replica waits for it.
    engine.synthesize("Hello there.")
    return engine
