"""voicestack and Pipecat side by side: the same models, the same audio, the same end-of-turn
silence, alternating in one run, at 1 session and at several at once.

  python -m load.side_by_side [--levels 1,2,4] [--questions 3] [--rounds 2] [--json PATH]
  make bench-pipecat            # the same, after making Pipecat's venv (build/venv-pipecat)

Both sides, on this machine:
  audio     load/speech.py's espeak-ng questions (16 kHz PCM16, 20 ms frames at real-time
            pace, silence before and after), each session starting at a different one;
            every session first listens to the agent's opening ("You are talking to an AI
            assistant."), then asks its questions, waiting for each answer to finish playing
  VAD/turn  Silero; 0.6 s of silence ends the turn (voicestack: the edge's endpointing
            silence_ms=600; Pipecat: VAD stop_secs 0.2 + a 0.4 s speech timeout, its
            defaults' shape)
  STT       faster-whisper tiny.en int8, the same model files
  LLM       SmolLM2-135M Q4_1 on ONE llama.cpp server (llama_cpp.server from
            llama-cpp-python, in voicestack's venv) that both use: voicestack's LLM stage with
            VOICESTACK_LLM_ENGINE=openai, Pipecat with OpenAILLMService. Same system prompt,
            max_tokens 80, temperature 0.3, seed. Pipecat has no in-process llama.cpp service,
            so a server is how a Pipecat user runs this model; sharing it takes the LLM engine
            out of the comparison.
  TTS       Kokoro-82M int8 through voicestack's KokoroEngine (same model, phonemes, voice)
  v2v       measured at the client on both: the question's last speech frame sent -> the
            first agent audio received (voicestack: load/generator.py's client_v2v_ms)

voicestack runs as its launcher starts it (NATS and five processes); Pipecat as N pipelines in
one process (load/pipecat_side.py in build/venv-pipecat), as Pipecat's runners host bots.
Per level, `--rounds` rounds; in each, one side's block of sessions then the other's, the
order swapping every round, so other work on the machine falls on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from load.stats import fmt_ms, summarize, table, write_json
from load.system import REPO, loadavg, machine

PIPECAT_VENV = REPO / "build" / "venv-pipecat"
PIPECAT_PYTHON = PIPECAT_VENV / "bin" / "python"
LLM_ALIAS = "smollm2"
SIDES = ("voicestack", "pipecat")
# What each side's turn records carry, for the breakdown (all ms from the end of speech,
# except the stage durations).
BREAKDOWN = ("client_v2v_ms", "endpointing_ms", "llm_first_token_ms", "tts_first_audio_ms")


def parse_levels(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]: distinct, ascending, each at least 1."""
    levels = sorted({int(part) for part in text.split(",") if part.strip()})
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError(f"levels must be positive integers, got {text!r}")
    return levels


def round_order(level_index: int, round_: int) -> tuple[str, str]:
    """Which side goes first in a round: alternating round by round, and level by level, so
    neither side always runs right after the other (ABBA...)."""
    return SIDES if (level_index + round_) % 2 == 0 else SIDES[::-1]


def compare(records: dict[str, list[dict]], metric: str = "client_v2v_ms") -> dict:
    """p50/p95 of `metric` over each side's completed turns and the ratio of the medians
    (voicestack / Pipecat: below 1 is voicestack faster)."""
    out = {}
    for side in SIDES:
        values = [t[metric] for t in records.get(side, []) if t.get("ok") and t.get(metric, 0) > 0]
        out[side] = summarize(values)
        out[side]["turns_ok"] = sum(bool(t.get("ok")) for t in records.get(side, []))
        out[side]["turns"] = len(records.get(side, []))
    v, p = out["voicestack"]["p50"], out["pipecat"]["p50"]
    out["ratio_p50"] = v / p if p and not math.isnan(p) and not math.isnan(v) else math.nan
    v95, p95 = out["voicestack"]["p95"], out["pipecat"]["p95"]
    out["ratio_p95"] = v95 / p95 if p95 and not math.isnan(p95) and not math.isnan(v95) else math.nan
    return out


def _ratio(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def results_table(levels: list[dict]) -> str:
    rows = []
    for lv in levels:
        c = lv["v2v"]
        v, p = c["voicestack"], c["pipecat"]
        rows.append([lv["sessions"], f"{v['turns_ok']}/{v['turns']}", fmt_ms(v["p50"]), fmt_ms(v["p95"]),
                     f"{p['turns_ok']}/{p['turns']}", fmt_ms(p["p50"]), fmt_ms(p["p95"]), _ratio(c["ratio_p50"]),
                     _ratio(c["ratio_p95"])])
    return table(["sessions", "voicestack turns ok", "voicestack v2v p50", "voicestack v2v p95", "Pipecat turns ok",
                  "Pipecat v2v p50", "Pipecat v2v p95", "ratio p50", "ratio p95"], rows)


def breakdown_table(levels: list[dict]) -> str:
    """Where the time went, p50 of each step, both sides named alike: endpointing = end of
    speech -> turn end decided (voicestack: its TurnMetrics; Pipecat: the user aggregator's
    context frame), LLM = that -> first token, TTS = first token -> first audio out of TTS."""
    rows = []
    for lv in levels:
        for side in SIDES:
            s = {m: summarize(t[m] for t in lv["turns"][side] if t.get("ok") and t.get(m, 0) > 0) for m in BREAKDOWN}
            extra = ""
            if side == "voicestack":
                stt = summarize(t["stt_final_ms"] for t in lv["turns"][side] if t.get("ok") and t.get("stt_final_ms", 0) > 0)
                extra = f"STT final {fmt_ms(stt['p50'])}"
            else:
                tr = summarize(t["transcript_ms"] - t["vad_stop_ms"] for t in lv["turns"][side]
                               if t.get("ok") and t.get("transcript_ms", 0) > 0 and t.get("vad_stop_ms", 0) > 0)
                extra = f"Whisper after VAD stop {fmt_ms(tr['p50'])}"
            rows.append([lv["sessions"], side, fmt_ms(s["client_v2v_ms"]["p50"]), fmt_ms(s["endpointing_ms"]["p50"]),
                         fmt_ms(s["llm_first_token_ms"]["p50"]), fmt_ms(s["tts_first_audio_ms"]["p50"]), extra])
    return table(["sessions", "side", "v2v p50", "endpointing p50", "LLM first token p50", "TTS first audio p50",
                  "STT"], rows)


# ---------------------------------------------------------------- the processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlmServer:
    """llama_cpp.server on SmolLM2, in voicestack's venv: n_ctx 2048 and llama-cpp-python's
    default threads (half the CPUs to generate, all for the prompt), as voicestack's
    in-process engine; requests queue (interrupt_requests off: the default would cut a
    streaming reply short when another session's request arrives)."""

    def __init__(self, log: Path):
        from voicestack import models

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(models.smollm2_gguf()), "--model_alias", LLM_ALIAS,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--interrupt_requests", "false"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited ({self.process.returncode}): see {log}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"llama_cpp.server did not answer in 120 s: see {log}")

    def flush(self) -> None:
        """A one-token request on an unrelated prompt: the server keeps the KV of the last
        prompt only, so the next block starts cold whichever side asked the same question last."""
        body = json.dumps({"model": LLM_ALIAS, "max_tokens": 1, "temperature": 0.0,
                           "messages": [{"role": "system", "content": "Count."}, {"role": "user", "content": "1 2 3"}]})
        request = urllib.request.Request(self.url + "/chat/completions", body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            resp.read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


class PipecatSide:
    """load/pipecat_side.py in Pipecat's venv: one JSON command in, one JSON line out."""

    def __init__(self, speech_path: Path, llm_url: str, settings, log: Path, vad_stop_secs: float, turn_wait_secs: float,
                 end_of_turn: str = "silence"):
        if not PIPECAT_PYTHON.exists():
            raise SystemExit(f"{PIPECAT_PYTHON} is missing: `make bench-pipecat` makes Pipecat's venv (then runs this)")
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [str(PIPECAT_PYTHON), str(REPO / "load" / "pipecat_side.py"), "--speech", str(speech_path),
             "--llm-url", llm_url, "--llm-model", LLM_ALIAS, "--system-prompt", settings.system_prompt,
             "--opening", settings.disclosure_text, "--max-tokens", str(settings.llm_max_tokens),
             "--temperature", str(settings.llm_temperature), "--vad-stop-secs", str(vad_stop_secs),
             "--turn-wait-secs", str(turn_wait_secs), "--end-of-turn", end_of_turn],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"the Pipecat side did not start: {ready}")

    def _read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the Pipecat side exited ({self.process.poll()}): see {self._log.name}")
            if line.startswith("{"):
                return json.loads(line)

    def run_level(self, sessions: int, turns: int, rotate: int, ramp_s: float) -> dict:
        self.process.stdin.write(json.dumps({"sessions": sessions, "turns": turns, "rotate": rotate, "ramp_s": ramp_s}) + "\n")
        self.process.stdin.flush()
        return self._read()["level"]

    def stop(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        self._log.close()


def write_speech(speech: list, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, texts=np.array([t for t, _ in speech]), **{f"audio{i}": a for i, (_, a) in enumerate(speech)})
    return path


def rotated(speech: list, k: int) -> list:
    k %= len(speech)
    return speech[k:] + speech[:k]


def run(levels: list[int], questions: int, questions_many: int, rounds: int, vad_stop_secs: float,
        turn_wait_secs: float, out_dir: Path, end_of_turn: str = "silence", progress=print) -> dict:
    from voicestack.config import Settings
    from voicestack.launcher import START_ORDER, Stack

    from load import speech as speech_mod
    from load.generator import Plan, run_level

    settings = Settings()
    speech = speech_mod.sentences()
    speech_path = write_speech(speech, out_dir / "speech.npz")
    llm = LlmServer(out_dir / "llm-server.log")
    env = {"VOICESTACK_CAPACITY": str(max(levels) + 2), "VOICESTACK_LLM_ENGINE": "openai",
           "VOICESTACK_LLM_URL": llm.url, "VOICESTACK_LLM_MODEL": LLM_ALIAS}
    if end_of_turn == "model":  # the edge's default for sessions that do not choose: Smart Turn v3.2 in the VAD stage
        env["VOICESTACK_ENDPOINTING_MODE"] = "model"
    pipecat = stack = None
    result: dict = {"levels": []}
    try:
        progress("starting voicestack (NATS + five services) and the Pipecat side...")
        stack = Stack(ports="free", log_dir=out_dir / "logs", env=env)
        stack.start(START_ORDER)
        address = stack.processes["edge"].address
        pipecat = PipecatSide(speech_path, llm.url, settings, out_dir / "pipecat.log", vad_stop_secs, turn_wait_secs,
                              end_of_turn)

        def voicestack_level(n: int, turns: int, rotate: int, ramp_s: float) -> dict:
            plan = Plan(sessions=n, turns=turns, ramp_s=ramp_s, turn_timeout_s=90.0)
            return asyncio.run(run_level(address, plan, rotated(speech, rotate), progress=False))

        # Discarded warm-ups: every model has run once on both sides before anything is timed.
        progress("warm-up turns (discarded)...")
        voicestack_level(1, 1, 0, 0.0)
        pipecat.run_level(1, 1, 0, 0.0)
        for li, n in enumerate(levels):
            turns = questions if n == 1 else questions_many
            ramp = 0.0 if n == 1 else 2.0
            records: dict[str, list[dict]] = {side: [] for side in SIDES}
            load_at_start = loadavg()
            for r in range(rounds):
                for side in round_order(li, r):
                    llm.flush()
                    began = time.monotonic()
                    level = (voicestack_level if side == "voicestack" else pipecat.run_level)(n, turns, r * turns, ramp)
                    for t in level["turns"]:
                        t["round"] = r
                    records[side] += level["turns"]
                    ok = [t["client_v2v_ms"] for t in level["turns"] if t.get("ok")]
                    progress(f"  {n} session(s), round {r + 1}/{rounds}, {side:10s}: {len(ok)}/{len(level['turns'])} ok, "
                             f"v2v p50 {fmt_ms(summarize(ok)['p50'])} ms ({time.monotonic() - began:.0f} s)")
            entry = {"sessions": n, "questions_per_session": turns, "rounds": rounds, "v2v": compare(records),
                     "loadavg": [load_at_start, loadavg()], "turns": records}
            result["levels"].append(entry)
            progress(f"{n} session(s): voicestack p50 {fmt_ms(entry['v2v']['voicestack']['p50'])} ms, "
                     f"Pipecat p50 {fmt_ms(entry['v2v']['pipecat']['p50'])} ms, ratio {_ratio(entry['v2v']['ratio_p50'])}")
    finally:
        if pipecat:
            pipecat.stop()
        if stack:
            stack.stop_all()
        llm.stop()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.side_by_side", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=parse_levels, default=[1, 2, 4], help="sessions at once, e.g. 1,2,4 (default)")
    p.add_argument("--questions", type=int, default=3, help="questions per session per round at 1 session")
    p.add_argument("--questions-many", type=int, default=2, help="questions per session per round above 1 session")
    p.add_argument("--rounds", type=int, default=2, help="rounds per level; each runs both sides, order swapping")
    p.add_argument("--pipecat-vad-stop", type=float, default=0.2, help="Pipecat's Silero stop_secs (default 0.2)")
    p.add_argument("--pipecat-turn-wait", type=float, default=0.4,
                   help="Pipecat's speech timeout after the VAD stop (default 0.4: 0.6 s of silence in all)")
    p.add_argument("--end-of-turn", choices=("silence", "model"), default="silence",
                   help="silence (default): 0.6 s on both; model: each side's Smart Turn v3.2 (voicestack: "
                        "endpointing_mode=model; Pipecat: its default stop strategy, VAD stop_secs 0.2)")
    p.add_argument("--out", type=Path, default=REPO / "build" / "side-by-side", help="logs and the speech file")
    p.add_argument("--json", type=Path, help="write every turn of both sides here")
    args = p.parse_args(argv)
    if not 0.0 <= args.pipecat_vad_stop <= 2.0:
        p.error("--pipecat-vad-stop: 0-2 s")

    command = "python -m load.side_by_side " + " ".join(argv if argv is not None else sys.argv[1:])
    header = {**machine(), "command": command.strip()}
    started = time.monotonic()
    result = run(args.levels, args.questions, args.questions_many, args.rounds, args.pipecat_vad_stop,
                 args.pipecat_turn_wait, args.out, args.end_of_turn, progress=lambda line: print(line, file=sys.stderr, flush=True))
    result["machine"] = {**header, "loadavg_end": loadavg(), "took_s": time.monotonic() - started}
    result["settings"] = {"end_of_turn": args.end_of_turn, "voicestack_endpointing_silence_ms": 600,
                          "pipecat_vad_stop_secs": args.pipecat_vad_stop, "pipecat_turn_wait_secs": args.pipecat_turn_wait,
                          "llm": f"llama_cpp.server, {LLM_ALIAS} (SmolLM2-135M-Instruct Q4_1), shared"}
    m = result["machine"]
    print(f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}; commit {m['commit']}; {m['date']}; "
          f"took {m['took_s']:.0f} s")
    print(f"- load average at start / end: {m['loadavg']} / {m['loadavg_end']}")
    print(f"- command: `{m['command']}`\n")
    print(results_table(result["levels"]))
    print()
    print(breakdown_table(result["levels"]))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
