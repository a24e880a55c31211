"""load/side_by_side.py and load/pipecat_side.py: the pure parts (no Pipecat, no models)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `load/` sits beside services/, not inside the installed package

from load import pipecat_side  # numpy only at import: Pipecat loads inside its own venv
from load.side_by_side import SIDES, compare, parse_levels, round_order

pytestmark = pytest.mark.fast


def test_levels_parse_sorted_and_distinct():
    assert parse_levels("4,1,2,2") == [1, 2, 4]
    for bad in ("0,1", "", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_levels(bad)


def test_each_side_goes_first_in_turn():
    firsts = [round_order(level, r)[0] for level in range(2) for r in range(2)]
    assert sorted(firsts) == sorted(SIDES * 2)  # each side first as often as the other
    assert round_order(0, 0) != round_order(0, 1)  # and never the same order two rounds running
    assert set(round_order(1, 3)) == set(SIDES)


def test_compare_uses_completed_turns_and_divides_the_medians():
    def turns(*v2v, failed=0):
        return [{"ok": True, "client_v2v_ms": v} for v in v2v] + [{"ok": False, "client_v2v_ms": 0.0}] * failed

    c = compare({"voicestack": turns(1000, 2000, 3000, failed=1), "pipecat": turns(2000, 4000)})
    assert c["voicestack"]["p50"] == 2000 and c["pipecat"]["p50"] == 3000
    assert c["voicestack"]["turns_ok"] == 3 and c["voicestack"]["turns"] == 4
    assert math.isclose(c["ratio_p50"], 2000 / 3000)
    assert math.isnan(compare({"voicestack": turns(1000), "pipecat": []})["ratio_p50"])


def test_pipecat_caller_times_from_the_end_of_speech_and_waits_for_the_reply_to_play():
    state = pipecat_side.CallState()
    state.audio_out(1.0)  # the opening: before any question
    assert state.opening_audio == 1.0 and not state.first_audio
    state.reset(10.0)  # the question's last speech frame leaves at t=10 s
    state.mark("turn_end", 10.6)
    state.mark("turn_end", 11.0)  # only the first counts
    state.audio_out(12.5)
    state.audio_out(12.6)
    assert pipecat_side.ms(state.end_of_speech, state.first_audio) == pytest.approx(2500)
    assert state.marks["turn_end"] == 10.6
    assert not state.reply_over(13.0)  # the TTS has not finished the reply
    state.llm_done = True
    assert not state.reply_over(12.7)  # still playing
    assert state.reply_over(13.0)
    assert pipecat_side.ms(10.0, 0.0) == 0.0  # a step never seen
