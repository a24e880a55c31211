"""`voicestack`: serve one service or gateway, bring up the embedded default, or talk to it."""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys
import time

from voicestack.config import GATEWAYS, SERVICES, add_flags, edge_api_key, flag_overrides, load_settings


def build_service(name: str, settings):
    # Imported here so `voicestack serve vad` never loads the LLM's libraries.
    if name == "edge":
        from voicestack.edge.server import EdgeService as cls
    elif name == "vad":
        from voicestack.vad.server import VadStage as cls
    elif name == "stt":
        from voicestack.stt.server import SttStage as cls
    elif name == "llm":
        from voicestack.llm.server import LlmStage as cls
    else:
        from voicestack.tts.server import TtsStage as cls
    return cls(settings)


# `talk`: how long after the audio (and the silence that ends its last turn) a turn may
# still start before the WAV counts as holding no speech.
NO_SPEECH_GRACE_SECONDS = 2.0


def run_gateway(name: str, settings) -> None:
    """A gateway runs its own loop (an HTTP or SIP listener, no bus) until SIGTERM, then drains."""
    try:  # their libraries (aiortc, sipmessage, aiortp...) are the `gateways` extra
        if name == "web":
            from voicestack.web.gateway import run
        else:
            from voicestack.sip.gateway import run
    except ImportError as error:
        raise SystemExit(f"serve {name}: {error}; install the gateways extra: pip install 'voicestack[gateways]'")
    run(settings)


def cmd_serve(args) -> int:
    from voicestack import runtime

    settings = load_settings(args.service, flag_overrides(args))
    if args.service in GATEWAYS:
        run_gateway(args.service, settings)
        return 0
    service = build_service(args.service, settings)
    runtime.run(service, settings)
    return 0


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def _progress(process) -> None:
    print(f"  {process.name:<5} ready in {process.ready_after:5.1f}s  (pid {process.popen.pid}, {process.url})", flush=True)


# Settings each process of `up` gets its own value of (the launcher assigns them).
PER_PROCESS_SETTINGS = ("nats_url", "grpc_port", "metrics_port", "replica_id", "capacity", "llm_pool",
                        "web_edge_address", "sip_edge_address",
                        # each process its own role on the bus (`up` makes them: bus_permissions.py)
                        "nats_user", "nats_password_file", "nats_inbox_prefix")


def add_stack_flags(parser) -> None:
    """`up` takes the services' settings (--llm-engine openai --llm-url ...) and hands them to all five."""
    from dataclasses import fields

    from voicestack.config import Settings, _coerce

    for f in fields(Settings):
        if f.name in PER_PROCESS_SETTINGS:
            continue
        kind = type(getattr(Settings(), f.name))
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const=True, default=None, metavar="BOOL",
                                type=lambda raw, flag=flag: _coerce(bool, raw, flag))
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper())


def stack_env(args) -> dict:
    """The settings given to `up` as the VOICESTACK_* environment of every service it starts."""
    from dataclasses import fields

    from voicestack.config import Settings

    env = {}
    for f in fields(Settings):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in PER_PROCESS_SETTINGS:
            env[f"VOICESTACK_{f.name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def start_stack(log_dir: str, env: dict | None = None, strong_llm: bool = False, gateways=(),
                free_ports: bool = False):
    from voicestack.launcher import START_ORDER, STRONG_LLM, Stack

    # Through the environment, not argv: a secret (--llm-api-key) stays out of `ps`.
    stack = Stack(log_dir=log_dir, env=env, ports="free" if free_ports else "default")
    print(f"starting nats-server on {stack.nats_url} and {len(START_ORDER) + strong_llm} services; "
          f"loading models (logs in {log_dir}/)...", flush=True)
    if stack.credentials is not None:
        print(f"the bus takes only the services' own users (their passwords in {stack.credentials.directory}/)",
              flush=True)
    try:
        stack.start_nats()
        for service in START_ORDER:
            stack.spawn(service)
        if strong_llm:
            name, service, args = STRONG_LLM
            stack.spawn(service, name=name, args=args)
        stack.wait_ready(progress=_progress)
        if gateways:  # after the edge, pointed at it
            print(f"starting the {' and '.join(gateways)} gateway{'s' * (len(gateways) > 1)} "
                  f"in front of the edge ({stack.processes['edge'].address})...", flush=True)
            for gateway in gateways:
                stack.spawn(gateway)
            stack.wait_ready(gateways, timeout=60, progress=_progress)
    except (RuntimeError, TimeoutError, OSError) as error:
        stack.stop_all()
        raise SystemExit(f"voicestack up failed: {error}")
    return stack


def model_label(described: dict | None) -> str:
    """A service's model as it reports it: "SmolLM2-135M-Instruct.Q4_1 (cpu)", "qwen (openai)"."""
    if not described or described.get("model") in (None, "", "-"):
        return "-" if described else "?"
    # An OpenAI-compatible server runs the model elsewhere: this process's device says nothing.
    where = "openai" if described.get("engine") == "openai" else described.get("device", "")
    return f"{described['model']} ({where})" if where else str(described["model"])


def show_stack(stack) -> None:
    from voicestack.launcher import process_ready

    # What each service says it serves, not what the defaults would be (--llm-engine openai...).
    served = stack.served()
    rows = [["nats", str(stack.nats.pid), stack.nats_url, "-", "yes"]]
    for name, p in stack.processes.items():
        model = "-" if p.service in GATEWAYS else model_label(served.get(name))
        rows.append([name, str(p.popen.pid), p.url, model, "yes" if process_ready(p) else "no"])
    print()
    print_table(rows, ["service", "pid", "address", "model", "ready"])
    print(flush=True)


def cmd_up(args) -> int:
    gateways = [g for g in GATEWAYS if getattr(args, f"up_{g}")]
    stack = start_stack(args.log_dir, stack_env(args), strong_llm=args.strong_llm, gateways=gateways,
                        free_ports=args.free_ports)
    show_stack(stack)
    edge = stack.processes["edge"].address
    talk = "voicestack talk --wav IN.wav --out REPLY.wav" + (f" --address {edge}" if edge != "127.0.0.1:50051" else "")
    print(f"Talk to it: {talk}   (Ctrl-C stops everything)")
    if "web" in stack.processes:
        print(f"Talk to it from a browser: {stack.processes['web'].url}")
    if "sip" in stack.processes:
        print(f"Call it: {stack.processes['sip'].url}")
    sys.stdout.flush()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    try:
        while not stopping:
            dead = [p.name for p in stack.processes.values() if not p.alive()]
            if dead:
                print(f"service exited: {', '.join(dead)}; see {args.log_dir}/", file=sys.stderr)
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("stopping...", flush=True)
    stack.stop_all()
    print("stopped.")
    return 0


def print_waterfall(trace, width: int = 40) -> None:
    """A turn's spans as the terminal can draw them: offset, duration and a bar."""
    if not trace.spans:
        return
    total = max(s.start_ms + s.duration_ms for s in trace.spans) or 1.0
    print(f"trace {trace.trace_id}")
    depth = {"": -1}
    for span in trace.spans:
        depth[span.name] = depth.get(span.parent_name, 0) + 1
    for span in trace.spans:
        start = int(span.start_ms / total * width)
        length = max(1, int(span.duration_ms / total * width))
        label = "  " * depth.get(span.name, 0) + span.name
        print(f"  {label:<22} {span.start_ms:7.0f} ms {span.duration_ms:7.0f} ms  |{' ' * start}{'#' * length}")


def print_conversation(conversation) -> None:
    if conversation.opening:
        print(f"agent opened: {conversation.opening.reply_text.strip()!r}")
    results = {r.call_id: r for r in conversation.tool_results}
    for call in conversation.tool_calls:
        result = results.get(call.id)
        outcome = ("withdrawn" if call.id in conversation.tools_cancelled else
                   f"error: {result.error}" if result and result.error else
                   f"-> {result.content!r}" if result else "(no answer)")
        print(f"tool call:  {call.name}({call.arguments_json}) {outcome}")
    for turn in conversation.replies:
        print(f"you said:   {turn.transcript!r}")
        print(f"agent said: {turn.reply_text.strip()!r}")
        if turn.interrupted:
            print(f"(interrupted after {turn.interrupted.played_ms} ms)")
        m = turn.metrics
        if m:
            print_table([
                ["end of speech -> turn end decided (endpointing)", f"{m.endpointing_ms:7.0f}"],
                ["turn end -> final transcript (STT)", f"{m.stt_final_ms:7.0f}"],
                ["LLM request -> first token", f"{m.llm_first_token_ms:7.0f}"],
                ["first text to TTS -> first audio", f"{m.tts_first_audio_ms:7.0f}"],
                ["voice-to-voice (end of speech -> first agent audio out)", f"{m.voice_to_voice_ms:7.0f}"],
            ], ["latency", "ms"])
        if turn.trace is not None:
            print()
            print_waterfall(turn.trace)
        print()
    for error in conversation.errors:
        print(f"error from {error.stage or 'edge'}: {error.message}", file=sys.stderr)


async def _talk(args) -> int:
    import grpc

    from voicestack.audio import PIPELINE_RATE, read_wav, write_wav
    from voicestack.client import converse, load_tools_file
    from voicestack.v1 import edge_pb2

    try:
        audio = read_wav(args.wav)
    except (OSError, ValueError) as error:
        print(f"talk: {error}", file=sys.stderr)
        return 2
    if audio.size == 0:
        print(f"talk: {args.wav} holds no audio (0 samples); nothing to say", file=sys.stderr)
        return 2
    config = edge_pb2.SessionConfig(voice=args.voice, system_prompt=args.system_prompt)
    tool_functions = None
    if args.tools:
        try:
            tools_config, tool_functions = load_tools_file(args.tools)
        except (OSError, ValueError) as error:
            print(f"talk: --tools: {error}", file=sys.stderr)
            return 2
        config.tools.CopyFrom(tools_config)
    metadata, credentials = None, None
    api_key = edge_api_key()
    if api_key:
        metadata = (("authorization", f"Bearer {api_key}"),)
    if args.tls_ca:
        with open(args.tls_ca, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
    conversation = await converse(args.address, audio, config=config, speed=args.speed, timeout=args.timeout,
                                  metadata=metadata, credentials=credentials, no_speech_grace=NO_SPEECH_GRACE_SECONDS,
                                  tools=tool_functions, frame_ms=args.frame_ms)
    if conversation.status.name != "OK":
        print(f"talk: {conversation.status.name}: {conversation.details}", file=sys.stderr)
        return 1
    if conversation.no_speech:
        print(f"talk: no speech was detected in {args.wav} ({audio.size / PIPELINE_RATE:.1f}s of audio sent; "
              f"the edge heard only silence or noise)", file=sys.stderr)
        return 1
    print_conversation(conversation)
    turns = ([conversation.opening] if conversation.opening else []) + conversation.replies
    audio_out = b"".join(bytes(t.audio) for t in turns)
    if args.out:
        write_wav(args.out, audio_out, conversation.output_rate)
        print(f"wrote {len(audio_out) / 2 / conversation.output_rate:.1f}s of agent audio to {args.out}")
    # The opening (disclosure, greeting) is always spoken: only an answer to the WAV is success.
    if not any(t.audio for t in conversation.replies):
        print(f"talk: the agent did not answer what it heard in {args.wav}", file=sys.stderr)
        return 1
    return 0


def cmd_talk(args) -> int:
    return asyncio.run(_talk(args))


def cmd_hash_key(args) -> int:
    """The API-keys file line for a key read from stdin (the key itself is never stored)."""
    from voicestack.edge.admission import digest

    key = sys.stdin.readline().strip()
    if not key:
        print("hash-key: give the key on stdin, e.g. `openssl rand -hex 24 | tee key.txt | voicestack hash-key`",
              file=sys.stderr)
        return 2
    print(f"{digest(key)}  {args.name}  sessions={args.sessions}  per_minute={args.per_minute}")
    return 0


def cmd_demo(args) -> int:
    stack = start_stack(args.log_dir)
    show_stack(stack)
    try:
        print(f"asking the question in {args.wav}, at real-time pace...\n", flush=True)
        return cmd_talk(args)
    finally:
        stack.stop_all()


def cmd_status(args) -> int:
    from voicestack import status

    return status.run(args)


def add_talk_flags(parser) -> None:
    parser.add_argument("--wav", required=True, help="WAV to speak (any rate/channels; converted)")
    parser.add_argument("--out", default="REPLY.wav", help="where to write the agent's audio")
    parser.add_argument("--address", default="127.0.0.1:50051", help="the edge's gRPC address")
    parser.add_argument("--frame-ms", type=int, default=20, choices=range(10, 101, 10), metavar="10-100",
                        help="audio per request, in steps of 10 ms (default 20; 60 spends about a quarter less of "
                             "the edge's CPU for up to 40 ms more buffering here)")
    parser.add_argument("--speed", type=float, default=1.0, help="stream at this multiple of real time")
    parser.add_argument("--voice", default="")
    parser.add_argument("--system-prompt", default="")
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--tls-ca", default="", help="CA certificate: connect with TLS (the edge's --tls-cert-file)")
    parser.add_argument("--tools", default="", help="JSON file of client tools the agent may call (see README, Tools)")
    # The API key comes from VOICESTACK_API_KEY, never a flag: flags show up in `ps`.


def cmd_recordings(args) -> int:
    """retention / export / erase on the recording store, each audited (see README,
    Recording and compliance). Exit 0 done, 1 no such recording, 2 bad setup or store down."""
    from datetime import datetime, timezone

    from voicestack import recordings

    settings = load_settings("edge", flag_overrides(args))
    missing = [name for name in ("recording_store", "recording_audit_log") if not getattr(settings, name)]
    if missing:
        print(f"set {' and '.join(missing)} (VOICESTACK_{missing[0].upper()} or --{missing[0].replace('_', '-')})",
              file=sys.stderr)
        return 2
    try:
        store = recordings.open_store(settings)
        audit = recordings.AuditLog(settings.recording_audit_log)
        if args.command == "retention":
            deleted = recordings.retention(store, datetime.now(timezone.utc), audit)
            print(f"deleted {len(deleted)} expired recording(s)" + "".join(f"\n  {s}" for s in deleted))
        elif args.command == "export":
            print(recordings.export(store, args.session, args.to, audit))
        else:
            removed = recordings.erase(store, args.session, audit)
            print(f"erased {args.session}: {len(removed)} file(s)" if removed else f"no recording of {args.session}")
    except recordings.StoreUnavailable as error:
        print(f"recording store unavailable: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a malformed session id
        print(str(error), file=sys.stderr)
        return 2
    except KeyError:
        print(f"no recording of {args.session}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    # No abbreviated flags: "--api-key K" must not quietly become --api-keys-file K (and a
    # key must never be a flag, where `ps` shows it).
    parser = argparse.ArgumentParser(prog="voicestack", description=__doc__, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser = functools.partial(commands.add_parser, allow_abbrev=False)

    serve = commands.add_parser("serve", help="run one service (gRPC + NATS) or gateway until SIGTERM, then drain")
    serve.add_argument("service", choices=SERVICES + GATEWAYS, metavar="SERVICE",
                       help=f"a service on the bus ({', '.join(SERVICES)}) or a gateway to the edge: "
                            "web (a WebRTC page), sip (phone calls)")
    add_flags(serve)
    serve.set_defaults(run=cmd_serve)

    up = commands.add_parser("up", help="the embedded default: local NATS and all five services")
    up.add_argument("--log-dir", default="build/logs")
    up.add_argument("--strong-llm", action="store_true",
                    help="also start the llm-strong pool (the same embedded model, more room to answer)")
    up.add_argument("--web", dest="up_web", action="store_true",
                    help="also start the web gateway and print its URL (port: --web-port, default 8080)")
    up.add_argument("--sip", dest="up_sip", action="store_true",
                    help="also start the SIP gateway and print its SIP URI (port: --sip-port, default 5060)")
    up.add_argument("--free-ports", action="store_true",
                    help="any free ports instead of the documented ones (a second stack beside a first)")
    add_stack_flags(up)
    up.set_defaults(run=cmd_up)

    talk = commands.add_parser("talk", help="speak a WAV to the edge and save the reply")
    add_talk_flags(talk)
    talk.set_defaults(run=cmd_talk)

    hash_key = commands.add_parser("hash-key", help="print the API-keys file line for a key given on stdin")
    hash_key.add_argument("--name", default="client")
    hash_key.add_argument("--sessions", type=int, default=20, help="concurrent sessions allowed")
    hash_key.add_argument("--per-minute", type=int, default=60, help="new sessions allowed per minute")
    hash_key.set_defaults(run=cmd_hash_key)

    demo = commands.add_parser("demo", help="`up`, one `talk`, then stop")
    add_talk_flags(demo)
    demo.add_argument("--log-dir", default="build/logs")
    demo.set_defaults(run=cmd_demo)

    status = commands.add_parser(
        "status", help="every stage's replicas, load, latency and errors, from the bus (and the cluster)",
        description="Exit status: 0 healthy, 1 a stage has an error-level problem, 2 the bus or cluster is unreachable.")
    status.add_argument("--nats-url", default="nats://127.0.0.1:4222", help="comma-separated NATS server URLs")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")
    status.add_argument("--json", action="store_true", help="print JSON (with --watch: one line per reading)")
    status.add_argument("--kube", action="store_true", help="add the Kubernetes view: Deployments, autoscalers, pods")
    status.add_argument("--namespace", default=None, help="default: the in-cluster or kubeconfig context's namespace")
    status.add_argument("--release", default="voicestack", help="Helm release (label app.kubernetes.io/instance)")
    status.add_argument("--kubeconfig", default=None, help="default: in-cluster config, else $KUBECONFIG or ~/.kube/config")
    status.set_defaults(run=cmd_status)

    retention = commands.add_parser("retention", help="delete every recording past its expiry (audited)")
    export = commands.add_parser("export", help="copy one session's recording to a folder (an access request; audited)")
    export.add_argument("session")
    export.add_argument("--to", default=".", help="folder to copy it into (a subfolder per session)")
    erase = commands.add_parser("erase", help="delete one session's recording now (an erasure request; audited)")
    erase.add_argument("session")
    for command in (retention, export, erase):
        add_flags(command)
        command.set_defaults(run=cmd_recordings)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
