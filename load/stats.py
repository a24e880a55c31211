"""Percentiles, summaries and tables: pure functions (unit-tested), and the one JSON writer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

# The per-turn latencies the edge reports (TurnMetrics), in the order they happen,
# then what the load generator measures itself.
STAGE_METRICS = ("endpointing_ms", "stt_final_ms", "llm_first_token_ms", "tts_first_audio_ms")
TURN_METRICS = ("voice_to_voice_ms", *STAGE_METRICS, "client_v2v_ms")
LABELS = {
    "voice_to_voice_ms": "voice-to-voice",
    "endpointing_ms": "endpointing",
    "stt_final_ms": "STT final",
    "llm_first_token_ms": "LLM first token",
    "tts_first_audio_ms": "TTS first audio",
    "client_v2v_ms": "v2v at the client",
}
QUANTILES = (50, 95, 99)


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default); nan if empty."""
    data = sorted(float(v) for v in values)
    if not data:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be 0-100, got {q}")
    rank = (len(data) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def summarize(values: Iterable[float]) -> dict:
    """n, mean, max and p50/p95/p99 of the values that are numbers (nan, None skipped)."""
    data = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    summary = {"n": len(data), "mean": sum(data) / len(data) if data else math.nan, "max": max(data, default=math.nan)}
    summary.update({f"p{q}": percentile(data, q) for q in QUANTILES})
    return summary


def summarize_turns(turns: Sequence[dict], metrics: Sequence[str] = TURN_METRICS) -> dict:
    """Per metric, the summary over the turns that completed (`ok`) and have it (> 0)."""
    done = [t for t in turns if t.get("ok")]
    return {m: summarize(t[m] for t in done if t.get(m) and t[m] > 0) for m in metrics}


def fmt_ms(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool = True) -> str:
    """A Markdown table (or aligned plain text) with right-aligned number columns."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]

    def numeric(i: int) -> bool:
        return bool(cells) and all(_looks_numeric(r[i]) for r in cells)

    aligns = [numeric(i) for i in range(len(headers))]

    def line(values) -> str:
        parts = [v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, aligns)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts)

    out = [line([str(h) for h in headers])]
    if markdown:
        out.append("|" + "|".join(("-" * (w + 1) + ":") if right else ("-" * (w + 2)) for w, right in zip(widths, aligns)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells]
    return "\n".join(out)


def _looks_numeric(text: str) -> bool:
    text = text.strip().replace(",", "")
    if text in ("-", ""):
        return True
    try:
        float(text.split("/")[0].split(" ")[0].rstrip("%x"))
        return True
    except ValueError:
        return False


def latency_rows(levels: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per load level: v2v p50/p95/p99, each stage's p50, the client's view, failures."""
    headers = ["sessions", "turns ok", "v2v p50", "v2v p95", "v2v p99",
               "endpointing p50", "STT final p50", "LLM first token p50", "TTS first audio p50",
               "v2v at client p50", "errors", "refused"]
    rows = []
    for level in levels:
        s = level["summary"]
        v = s["voice_to_voice_ms"]
        rows.append([
            level["sessions"], f"{level['turns_ok']}/{level['turns_planned']}",
            fmt_ms(v["p50"]), fmt_ms(v["p95"]), fmt_ms(v["p99"]),
            *(fmt_ms(s[m]["p50"]) for m in STAGE_METRICS),
            fmt_ms(s["client_v2v_ms"]["p50"]),
            sum(level["errors"].values()), level["refused"],
        ])
    return headers, rows


def jsonable(value):
    """nan and inf as null, so the JSON is standard (browsers, jq)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, result: dict) -> None:
    """A result as standard JSON (see jsonable), its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=1, default=str))
