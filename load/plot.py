"""The PNG: voice-to-voice percentiles against concurrent sessions, and each level's
median turn split into its stages as stacked bars."""

from __future__ import annotations

import math
from pathlib import Path

from load.stats import LABELS, STAGE_METRICS

COLORS = {"endpointing_ms": "#9ecae1", "stt_final_ms": "#4292c6", "llm_first_token_ms": "#fd8d3c",
          "tts_first_audio_ms": "#74c476", "other": "#bdbdbd"}


def _finite(value) -> float:
    return 0.0 if value is None or math.isnan(value) else value


def draw(series: list[tuple[str, list[dict]]], path: str | Path, title: str = "voicestack load") -> Path:
    """series: [(name, levels)], each level a run_level() record. One row of two plots per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, levels) for name, levels in series if levels]
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 3.8 * len(rows)), squeeze=False)
    for (name, levels), (left, right) in zip(rows, axes):
        sessions = [level["sessions"] for level in levels]
        for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
            left.plot(sessions, [level["summary"]["voice_to_voice_ms"][q] for level in levels], style, label=f"v2v {q}")
        left.set_xlabel("concurrent sessions")
        left.set_ylabel("ms")
        left.set_title(f"{name}: voice-to-voice vs concurrent sessions", fontsize=10)
        left.set_ylim(bottom=0)
        if len(sessions) > 2 and max(sessions) / max(1, min(sessions)) > 20:
            left.set_xscale("log")
        left.grid(alpha=0.3)
        left.legend(fontsize=8)

        labels = [str(s) for s in sessions]
        bottom = [0.0] * len(levels)
        for metric in (*STAGE_METRICS, "other"):
            if metric == "other":  # the rest of the median v2v: waits and hops between the stages
                values = [max(0.0, _finite(level["summary"]["voice_to_voice_ms"]["p50"])
                              - sum(_finite(level["summary"][m]["p50"]) for m in STAGE_METRICS)) for level in levels]
                label = "rest of v2v"
            else:
                values = [_finite(level["summary"][metric]["p50"]) for level in levels]
                label = LABELS[metric]
            right.bar(labels, values, bottom=bottom, color=COLORS[metric], label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        right.set_xlabel("concurrent sessions")
        right.set_ylabel("ms (median of each)")
        right.set_title(f"{name}: where the median turn's time goes", fontsize=10)
        right.legend(fontsize=8)
        right.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
