"""The Pipecat side of `python -m load.side_by_side`: Pipecat 1.14 pipelines on the same
models, the same audio and the same end-of-turn silence as voicestack, driven the way
load/generator.py drives voicestack's edge. Runs in its own venv (build/venv-pipecat,
`make bench-pipecat` makes it), never in voicestack's.

One pipeline per session, all in this one process (what Pipecat's own runners do: a
bot function per connection, in the server's process), each built before its level starts:

  input     a transport that plays the caller: the question's 16 kHz PCM in 20 ms frames at
            real-time pace, silence before and after (an open microphone)
  STT       WhisperSTTService, faster-whisper tiny.en int8 on CPU (voicestack's model files)
  user agg  Silero VAD (Pipecat's own bundled model), stop_secs 0.2 (Pipecat's default) and
            a SpeechTimeoutUserTurnStopStrategy of 0.4 s: 0.6 s of silence ends the turn, as
            voicestack's endpointing silence does (both are arguments); or, with
            --end-of-turn model, Pipecat's default stop strategy (Smart Turn v3.2)
  LLM       OpenAILLMService against the same llama.cpp server (SmolLM2-135M) voicestack's
            LLM stage uses here; same system prompt, max_tokens, temperature, seed
  TTS       Kokoro-82M int8, synthesized by voicestack's own KokoroEngine (same model file,
            phonemizer, voice and threads), behind a TTSService like Pipecat's
            KokoroTTSService (which would download another Kokoro build from GitHub)
  output    a transport that "plays" the agent's audio on a simulated clock, as Pipecat's
            websocket transports do, and timestamps the first chunk of each reply

Voice-to-voice is measured as load/generator.py measures it at the client: the moment the
question's last speech frame is sent -> the first agent audio chunk out of the output
transport (where a transport would put it on the wire).

Protocol: stdout carries one JSON object per line (logs go to stderr): {"ready": ...} once
the models are loaded, then one {"level": ...} per command read from stdin, a JSON line
{"sessions": N, "turns": T, "rotate": K, "ramp_s": S} ("quit" ends it).

  build/venv-pipecat/bin/python load/pipecat_side.py --speech build/side-by-side/speech.npz \
      --llm-url http://127.0.0.1:8000/v1 --llm-model smollm2
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RATE = 16000
OUT_RATE = 24000
FRAME_MS = 20
OPENING_GRACE_S = 3.0  # as load/generator.py: no opening by then, start talking
GAP_MS = 300  # silence after an answer, before the next question (load/generator.py's Plan.gap_ms)
REPLY_QUIET_S = 0.3  # the reply is over: the LLM is done and nothing has played for this long


def kokoro_engine_module():
    """voicestack's tts/engine.py, loaded by path: its package __init__ imports the bus (grpc,
    nats), which this venv does not have; the engine itself needs only numpy, onnxruntime,
    phonemizer, espeakng-loader and voicestack.models / voicestack.config."""
    sys.path.insert(0, str(REPO / "services"))
    spec = importlib.util.spec_from_file_location("voicestack_tts_engine", REPO / "services/voicestack/tts/engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_speech(path: Path) -> list[tuple[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as npz:
        texts = [str(t) for t in npz["texts"]]
        return [(t, npz[f"audio{i}"].astype(np.float32)) for i, t in enumerate(texts)]


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def build_classes():
    """The Pipecat classes, defined once pipecat is importable (this venv only)."""
    from pipecat.frames.frames import (
        BotStartedSpeakingFrame,
        BotStoppedSpeakingFrame,
        ErrorFrame,
        InputAudioRawFrame,
        LLMContextFrame,
        LLMFullResponseEndFrame,
        LLMTextFrame,
        OutputAudioRawFrame,
        StartFrame,
        TranscriptionFrame,
        TTSAudioRawFrame,
        VADUserStoppedSpeakingFrame,
    )
    from pipecat.observers.base_observer import BaseObserver, FramePushed
    from pipecat.services.tts_service import TTSService
    from pipecat.transports.base_input import BaseInputTransport
    from pipecat.transports.base_output import BaseOutputTransport
    from pipecat.transports.base_transport import BaseTransport

    class CallerInput(BaseInputTransport):
        """The caller's microphone: frames pushed by the caller task (CallState.speak)."""

        def __init__(self, params, state):
            super().__init__(params)
            self.state = state

        async def start(self, frame: StartFrame):
            await super().start(frame)
            await self.set_transport_ready(frame)
            self.state.ready.set()

        async def send(self, pcm: bytes):
            await self.push_audio_frame(InputAudioRawFrame(audio=pcm, sample_rate=RATE, num_channels=1))

    class PlayerOutput(BaseOutputTransport):
        """The caller's speaker: each chunk 'plays' on a clock (as FastAPIWebsocketOutputTransport
        paces its sends); the first chunk of a reply is its first agent audio."""

        def __init__(self, params, state):
            super().__init__(params)
            self.state = state
            self._play_until = 0.0

        async def start(self, frame: StartFrame):
            await super().start(frame)
            await self.set_transport_ready(frame)

        async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
            now = time.monotonic()
            self.state.audio_out(now)
            seconds = len(frame.audio) / 2 / frame.sample_rate
            if self._play_until <= now:
                self._play_until = now + seconds
            else:
                await asyncio.sleep(self._play_until - now)
                self._play_until += seconds
            return True

    class CallerTransport(BaseTransport):
        def __init__(self, params, state):
            super().__init__()
            self._in, self._out = CallerInput(params, state), PlayerOutput(params, state)

        def input(self):
            return self._in

        def output(self):
            return self._out

    class VoicestackKokoroTTS(TTSService):
        """Pipecat's KokoroTTSService with voicestack's Kokoro engine inside: the whole text
        Pipecat's sentence aggregator hands over, synthesized at once (KokoroEngine does one
        chunk per 510 tokens, so a sentence is one model call), in a thread."""

        def __init__(self, engine, **kwargs):
            from pipecat.services.settings import TTSSettings
            from pipecat.transcriptions.language import Language

            # stop_frame_timeout_s: a context with no audio for this long counts as done; the
            # default 3 s is shorter than a synthesis takes here with several sessions at once.
            super().__init__(push_start_frame=True, push_stop_frames=True, sample_rate=OUT_RATE,
                             stop_frame_timeout_s=30.0,
                             settings=TTSSettings(model="kokoro-82m-int8", voice=engine.default_voice,
                                                  language=Language.EN), **kwargs)
            self._engine = engine

        def can_generate_metrics(self) -> bool:
            return True

        async def run_tts(self, text: str, context_id: str):
            try:
                await self.start_tts_usage_metrics(text)
                audio = await asyncio.to_thread(self._engine.synthesize, text)
                await self.stop_ttfb_metrics()
                if len(audio):
                    yield TTSAudioRawFrame(audio=audio.tobytes(), sample_rate=OUT_RATE, num_channels=1,
                                           context_id=context_id)
            except Exception as exc:  # noqa: BLE001 (as KokoroTTSService does: an ErrorFrame, the call goes on)
                yield ErrorFrame(error=f"Kokoro failed: {exc}")
            finally:
                await self.stop_ttfb_metrics()

    class TurnObserver(BaseObserver):
        """When each frame that marks a step of the turn was first pushed (after the question's
        end of speech): the breakdown of where a Pipecat turn's time went."""

        def __init__(self, state, stt, llm, tts):
            super().__init__()
            self.state, self.stt, self.llm, self.tts = state, stt, llm, tts

        async def on_push_frame(self, data: FramePushed):
            frame, src, state = data.frame, data.source, self.state
            now = time.monotonic()
            if isinstance(frame, VADUserStoppedSpeakingFrame):
                state.mark("vad_stop", now)
            elif isinstance(frame, TranscriptionFrame) and src is self.stt:
                state.mark("transcript", now)
                state.transcript += frame.text
            elif isinstance(frame, LLMContextFrame):
                state.mark("turn_end", now)
            elif isinstance(frame, LLMTextFrame) and src is self.llm:
                state.mark("llm_first_token", now)
                state.reply += frame.text
            elif isinstance(frame, TTSAudioRawFrame) and src is self.tts:
                state.mark("tts_first_audio", now)
            elif isinstance(frame, LLMFullResponseEndFrame) and src is self.tts:
                state.llm_done = True  # the TTS queues it behind the reply's audio
            elif isinstance(frame, BotStartedSpeakingFrame):
                state.speaking = True
            elif isinstance(frame, BotStoppedSpeakingFrame):
                state.speaking = False

    return CallerTransport, VoicestackKokoroTTS, TurnObserver


class CallState:
    """One session's caller: what it said when, and what it heard."""

    def __init__(self):
        self.ready = asyncio.Event()
        self.reset(None)
        self.opening_audio = 0.0

    def reset(self, end_of_speech: float | None):
        self.end_of_speech = end_of_speech
        self.marks: dict[str, float] = {}
        self.first_audio = 0.0
        self.last_audio = 0.0
        self.llm_done = False
        self.speaking = False
        self.transcript = ""
        self.reply = ""

    def mark(self, name: str, at: float):
        if self.end_of_speech is not None and name not in self.marks:
            self.marks[name] = at

    def audio_out(self, at: float):
        self.last_audio = at
        if self.end_of_speech is None:
            self.opening_audio = self.opening_audio or at
        elif not self.first_audio:
            self.first_audio = at

    def reply_over(self, now: float) -> bool:
        return bool(self.first_audio and self.llm_done and not self.speaking and now - self.last_audio > REPLY_QUIET_S)


def ms(a: float | None, b: float | None) -> float:
    return (b - a) * 1000 if a and b and b >= a else 0.0


class Worker:
    def __init__(self, args):
        self.args = args
        self.speech = load_speech(args.speech)
        self.CallerTransport, self.Tts, self.Observer = build_classes()
        engine_module = kokoro_engine_module()
        from voicestack.config import cpu_share

        # One Kokoro for every session (as the TTS stage holds one for all its streams);
        # threads as build_engine gives voicestack's (the CPUs this process may use).
        self.kokoro = engine_module.KokoroEngine(threads=cpu_share())
        self.kokoro.synthesize("Hello there.")  # as build_engine: onnxruntime's first run plans
        from voicestack import models

        self.whisper_path = str(models.whisper_tiny_en())

    def session(self, index: int):
        """One Pipecat bot, as a Pipecat app builds one per connection."""
        from pipecat.audio.vad.silero import SileroVADAnalyzer
        from pipecat.audio.vad.vad_analyzer import VADParams
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.pipeline.worker import PipelineParams, PipelineWorker
        from pipecat.processors.aggregators.llm_context import LLMContext
        from pipecat.processors.aggregators.llm_response_universal import (
            LLMContextAggregatorPair,
            LLMUserAggregatorParams,
        )
        from pipecat.services.openai.llm import OpenAILLMService
        from pipecat.services.whisper.stt import WhisperSTTService
        from pipecat.transcriptions.language import Language
        from pipecat.transports.base_transport import TransportParams
        from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
        from pipecat.turns.user_turn_strategies import UserTurnStrategies

        a = self.args
        state = CallState()
        transport = self.CallerTransport(TransportParams(audio_in_enabled=True, audio_in_sample_rate=RATE,
                                                         audio_out_enabled=True, audio_out_sample_rate=OUT_RATE), state)
        stt = WhisperSTTService(device="cpu", compute_type="int8",
                                settings=WhisperSTTService.Settings(model=self.whisper_path, language=Language.EN))
        llm = OpenAILLMService(api_key="none", base_url=a.llm_url, settings=OpenAILLMService.Settings(
            model=a.llm_model, system_instruction=a.system_prompt, max_tokens=a.max_tokens, temperature=a.temperature,
            seed=a.seed))
        tts = self.Tts(self.kokoro)
        context = LLMContext()
        if a.end_of_turn == "model":  # Pipecat's default: Smart Turn v3 decides at each VAD stop
            strategies = UserTurnStrategies()
        else:
            strategies = UserTurnStrategies(stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=a.turn_wait_secs)])
        pair = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
            vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=a.vad_stop_secs)), user_turn_strategies=strategies))
        pipeline = Pipeline([transport.input(), stt, pair.user(), llm, tts, transport.output(), pair.assistant()])
        task = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=OUT_RATE),
                              observers=[self.Observer(state, stt, llm, tts)], enable_rtvi=False,
                              idle_timeout_secs=None)
        return task, transport, state

    async def run_level(self, sessions: int, turns: int, rotate: int, ramp_s: float, turn_timeout_s: float) -> dict:
        from pipecat.frames.frames import EndFrame, TTSSpeakFrame
        from pipecat.workers.runner import WorkerRunner

        speech = self.speech[rotate % len(self.speech):] + self.speech[: rotate % len(self.speech)]
        bots = [self.session(i) for i in range(sessions)]  # models loaded before any call starts
        records: list[dict] = []
        active = [0]

        async def call(index: int, task, transport, state: CallState):
            await asyncio.sleep(ramp_s * index / sessions)
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(task)
            running = asyncio.create_task(runner.run())
            await state.ready.wait()
            mic = transport.input()
            quiet = bytes(RATE * FRAME_MS // 1000 * 2)
            frame_s = FRAME_MS / 1000
            start = time.monotonic()
            sent = 0

            async def send(pcm: bytes):
                nonlocal sent
                await mic.send(pcm)
                sent += 1
                due = start + sent * frame_s
                if (now := time.monotonic()) < due:
                    await asyncio.sleep(due - now)

            # The agent's opening, as voicestack's edge speaks its disclosure first (and, as
            # there, not part of the LLM's history: both sides send the LLM the same prompts).
            await task.queue_frames([TTSSpeakFrame(self.args.opening, append_to_context=False)])
            deadline = time.monotonic() + turn_timeout_s
            while time.monotonic() < deadline:
                now = time.monotonic()
                if not state.opening_audio and now - start > OPENING_GRACE_S:
                    break
                if state.opening_audio and not state.speaking and now - state.last_audio > REPLY_QUIET_S:
                    break
                await send(quiet)
            active[0] += 1
            for j in range(turns):
                text, audio = speech[(index + j) % len(speech)]
                chunks = [pcm16(audio)[k: k + len(quiet)] for k in range(0, len(audio) * 2, len(quiet))]
                for k, pcm in enumerate(chunks):
                    if k == len(chunks) - 1:
                        state.reset(time.monotonic())
                    await send(pcm)
                concurrent = active[0]
                outcome = ""
                while not outcome:
                    now = time.monotonic()
                    if state.reply_over(now):
                        outcome = "ok"
                    elif now - state.end_of_speech > turn_timeout_s:
                        outcome = "TURN_TIMEOUT"
                    else:
                        await send(quiet)
                eos, m = state.end_of_speech, state.marks
                records.append({
                    "session": index, "turn": j + 1, "question": text, "ok": outcome == "ok", "outcome": outcome,
                    "concurrent": concurrent, "transcript": state.transcript.strip(), "reply": state.reply.strip(),
                    "reply_chars": len(state.reply.strip()),
                    "client_v2v_ms": ms(eos, state.first_audio),
                    # the steps, each from the end of speech (a 0 is a step not seen)
                    "vad_stop_ms": ms(eos, m.get("vad_stop")), "transcript_ms": ms(eos, m.get("transcript")),
                    "turn_end_ms": ms(eos, m.get("turn_end")), "llm_first_token_at_ms": ms(eos, m.get("llm_first_token")),
                    "tts_first_audio_at_ms": ms(eos, m.get("tts_first_audio")),
                    # and as voicestack's TurnMetrics name them
                    "endpointing_ms": ms(eos, m.get("turn_end")),
                    "llm_first_token_ms": ms(m.get("turn_end"), m.get("llm_first_token")),
                    "tts_first_audio_ms": ms(m.get("llm_first_token"), m.get("tts_first_audio")),
                })
                for _ in range(GAP_MS // FRAME_MS):
                    await send(quiet)
            active[0] -= 1
            await task.queue_frame(EndFrame())
            await running

        began = time.monotonic()
        await asyncio.gather(*(call(i, *bot) for i, bot in enumerate(bots)))
        return {"sessions": sessions, "turns_planned": sessions * turns, "turns_ok": sum(r["ok"] for r in records),
                "duration_s": time.monotonic() - began, "turns": records}


async def serve(args) -> None:
    worker = await asyncio.to_thread(Worker, args)
    print(json.dumps({"ready": True, "pid": __import__("os").getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            return
        cmd = json.loads(line)
        level = await worker.run_level(cmd["sessions"], cmd["turns"], cmd.get("rotate", 0), cmd.get("ramp_s", 0.0),
                                       cmd.get("turn_timeout_s", 90.0))
        print(json.dumps({"level": level}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speech", type=Path, required=True, help="npz: texts, audio0.. (float32, 16 kHz)")
    p.add_argument("--llm-url", required=True, help="OpenAI-compatible base URL, with /v1")
    p.add_argument("--llm-model", required=True)
    p.add_argument("--system-prompt", default="You are a helpful assistant who speaks English. Reply in one short sentence.")
    p.add_argument("--opening", default="You are talking to an AI assistant.")
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vad-stop-secs", type=float, default=0.2, help="Silero VADParams.stop_secs (Pipecat's default 0.2)")
    p.add_argument("--turn-wait-secs", type=float, default=0.4,
                   help="SpeechTimeoutUserTurnStopStrategy's user_speech_timeout, after the VAD's stop")
    p.add_argument("--end-of-turn", choices=("silence", "model"), default="silence",
                   help="silence: the speech timeout above; model: Pipecat's default stop strategy (Smart Turn v3)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
