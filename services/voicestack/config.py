"""The one config loader: defaults < VOICESTACK_* environment < command-line flags.

Every setting is a field of `Settings`; its env var is VOICESTACK_<FIELD>, its flag
--<field-with-dashes>. OpenTelemetry is configured by the standard OTEL_* variables
instead (see telemetry.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields

STAGES = ("vad", "stt", "llm", "tts")
# The NATS services: each a gRPC server on the bus (runtime.serve).
SERVICES = ("edge",) + STAGES
# The gateways: clients of the edge's Converse stream, each with its own listener (no NATS).
GATEWAYS = ("web", "sip")

# Default gRPC ports of the embedded default; in Kubernetes every pod uses 50051.
DEFAULT_GRPC_PORTS = {"edge": 50051, "vad": 50052, "stt": 50053, "llm": 50054, "tts": 50055}
# The gateways have no gRPC port, but a metrics port each (as the services; in Kubernetes 9464).
DEFAULT_METRICS_PORTS = {"edge": 9464, "vad": 9465, "stt": 9466, "llm": 9467, "tts": 9468, "web": 9469, "sip": 9470}
DEFAULT_CAPACITY = {"edge": 200, "vad": 200, "stt": 8, "llm": 4, "tts": 4}


@dataclass
class Settings:
    # Comma-separated NATS server URLs (a cluster is a list).
    nats_url: str = "nats://127.0.0.1:4222"
    nats_creds_file: str = ""
    nats_ca_file: str = ""
    # This process's NATS user (a role of bus_permissions.py: edge, vad, stt, llm, llm-strong,
    # tts, status) and the file holding its password; its inbox prefix ("" = _INBOX.<user>
    # with a user, else NATS' _INBOX) is the one its role may read.
    nats_user: str = ""
    nats_password_file: str = ""
    nats_inbox_prefix: str = ""
    # `voicestack up`: its local nats-server's TLS certificate and key (clients verify them with
    # nats_ca_file); with them the bus is tls://.
    nats_tls_cert_file: str = ""
    nats_tls_key_file: str = ""
    # gRPC listener. Stages bind to localhost unless told otherwise; the edge too,
    # until an operator exposes it (with TLS and API keys).
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # With a CA file, clients must present a certificate it signed (mTLS).
    tls_client_ca_file: str = ""
    # Prometheus scrape port (0 = none; unset: the service's or gateway's default port). It
    # binds to grpc_host (a gateway: web_host / sip_host) unless VOICESTACK_METRICS_HOST says.
    metrics_port: int = -1
    # Concurrent streams this replica takes before refusing opens.
    capacity: int = 0
    # Seconds a SIGTERM'd replica keeps serving its open streams.
    drain_seconds: float = 30.0
    # A stage that stays silent this long (no data, no heartbeat) is dead.
    peer_timeout_seconds: float = 0.8
    replica_id: str = ""
    # "cpu" or "cuda" for the model stages.
    device: str = "cpu"
    # Compute threads for a model (0 = the library default).
    threads: int = 0
    # LLM engine: "llamacpp" (embedded SmolLM2) or "openai" (any OpenAI-compatible server, e.g. vLLM).
    llm_engine: str = "llamacpp"
    llm_url: str = ""
    llm_model: str = ""
    llm_api_key: str = field(default="", repr=False)
    llm_max_tokens: int = 80
    # With llm_engine=openai: the replica joins its queue group only while this answers
    # (and gRPC health says NOT_SERVING meanwhile). "" = llm_url's server root + /health
    # (vLLM, llama.cpp's server; a server without one, answering 404, counts as up); "off": unchecked.
    llm_health_url: str = ""
    # With llm_engine=openai: the request header that carries the session id, for a router that
    # keeps a session on one model server (vLLM production-stack: --session-key x-user-id); "" = none.
    llm_session_header: str = "x-user-id"
    # Edge: a session's next LLM request goes first to the replica that served its last one
    # (its prefix is in that replica's KV cache); off = any replica of the pool (load/affinity.py).
    llm_affinity: bool = True
    # LLM replica: the pool it serves, "llm" (fast) or "llm-strong" (its own subjects,
    # Deployment and autoscaler).
    llm_pool: str = "llm"
    # Edge: "auto" picks a pool per turn (edge/routing.py); "fast" sends every turn to "llm"
    # unless the client asks (SessionConfig.llm_route).
    llm_routing: str = "auto"
    # A little randomness keeps small models out of repetition loops; the engine
    # seeds it, so a replayed request (failover) gives the same reply.
    llm_temperature: float = 0.3
    # STT model: "" = embedded tiny.en, or a faster-whisper size name / CTranslate2 path.
    stt_model: str = ""
    # STT: decode as soon as speech pauses, so the final transcript is (nearly) ready
    # when the edge ends the turn. Off = decode the whole utterance at its end.
    stt_pause_decode: bool = True
    tts_voice: str = ""
    # TTS: "phrase" speaks the reply's first words at their first natural break, then as
    # "clause", which speaks a clause (comma, 4+ words) as soon as it is written;
    # "sentence" waits for each sentence's end.
    tts_split: str = "phrase"
    # Measured on the embedded SmolLM2-135M: naming the language keeps it from drifting into French.
    system_prompt: str = "You are a helpful assistant who speaks English. Reply in one short sentence."
    # Edge: the AI disclosure the agent speaks first in every session (EU AI Act
    # transparency). Clients cannot turn it off or interrupt it; operators can.
    disclosure: bool = True
    disclosure_text: str = "You are talking to an AI assistant."
    # Edge, tools: said when a tool call fails (the turn then ends with an Error naming
    # the tool), and when the agent ends the call (end_call) without words of its own.
    tool_failure_text: str = "Sorry, I couldn't do that just now."
    goodbye_text: str = "Goodbye."
    # Edge, tools: a JSON or YAML file of HTTP tools and MCP servers ("" = none; README "Tools"),
    # and the hosts their URLs may use: comma-separated names or *.suffix patterns ("*" = any).
    # Empty allows no host, so a tool's secret headers go only where the operator says.
    tools_file: str = ""
    tools_allowed_hosts: str = ""
    # Edge, tools: spoken once when a tool is slow (a session's ToolsConfig.filler replaces it).
    tool_filler: str = "One moment."
    # Edge: speculative replies when a session does not choose (see BENCHMARKS.md).
    speculation: bool = False
    # Edge: how a turn ends unless the session says (SessionConfig.endpointing.mode):
    # "silence" (silence_ms) or "model" (the end-of-turn model in the VAD stage decides at
    # each pause of turn_pause_ms with turn_threshold, waiting at most turn_max_wait_ms).
    endpointing_mode: str = "silence"
    turn_threshold: float = 0.5
    turn_pause_ms: int = 200
    turn_max_wait_ms: int = 2500
    # Edge: a turn heard in one of these languages (with at least this probability; the
    # STT must be multilingual, stt_model=base) is answered in it: the LLM is asked to, the
    # TTS speaks it. Others are answered in English. The default: what Kokoro speaks here.
    reply_languages: str = "en,fr,de,es,it,pt,hi"
    language_min_probability: float = 0.5
    # Edge: give the LLM a note of how each turn was said (language, rate, level) unless the
    # session says (SessionConfig.voice_notes).
    voice_notes: bool = False
    # Edge: user speech shorter than this does not interrupt the agent.
    barge_in_min_speech_ms: int = 400
    # Edge: "mm-hm", "yeah", "right" over the agent do not interrupt it; speech over the
    # agent interrupts once its transcript has other words, or at backchannel_max_ms
    # (SessionConfig.interruption.backchannels). The price: an interruption waits for
    # its first words (see BENCHMARKS.md).
    ignore_backchannels: bool = True
    backchannel_max_ms: int = 2000
    # Edge: agent audio is sent at most this far ahead of the client's playback,
    # so an interruption has little audio to take back.
    audio_lead_ms: int = 300
    # Edge: a stage stream that is alive but sends nothing this long (while the edge waits
    # for its output) fails the turn.
    stage_stall_seconds: float = 30.0
    # Edge: a call whose client sends nothing (not even silence) this long is ended.
    idle_timeout_seconds: float = 30.0
    # Edge: audio goes to the stages in fewer, larger bus messages (the per-message cost,
    # not the bytes, limits sessions per edge core; see BENCHMARKS.md). The VAD gets whole
    # 32 ms windows, the only unit it decides on, so that costs no latency; the STT gets
    # `stt_batch_ms` at a time while the user speaks (0: every client frame), which can
    # start its decode at a pause up to that much later. Off = every frame to each.
    batch_stage_audio: bool = True
    stt_batch_ms: int = 60
    # Run the service's event loop on uvloop instead of asyncio's own. Off by default: its
    # gain here was within noise (BENCHMARKS.md), and one run of the slow-client test saw a
    # gRPC status arrive as INTERNAL with it on, not yet explained.
    uvloop: bool = False
    # Edge only: file of sha256 hex digests of accepted API keys, one a line ("" = no auth).
    api_keys_file: str = ""
    # Put transcript and reply text into trace spans (off: traces carry timings, not words).
    # They pass the "record" processors first (redact_records).
    trace_text: bool = False
    # Edge: processors on the conversation's text, by entry-point name, in order (README,
    # Extending the conversation): e.g. "pii,content_filter".
    processors: str = ""
    # Edge: what is traced or recorded passes the PII redactor ("pii"), whether or not
    # `processors` names it; pii_redact_llm: it also redacts what the LLM sees.
    redact_records: bool = True
    pii_redact_llm: bool = False
    # content_filter: extra words (one a line) and what the agent says instead of a clause with one.
    content_filter_words_file: str = ""
    content_filter_text: str = "Sorry, I can't say that."
    # Edge: record calls (README, Recording and compliance): off; when on, only after the
    # caller consents (asked after the disclosure, or SessionConfig.recording_consent), to
    # recording_store: a path or file:///path (a volume), or s3://bucket at recording_s3_endpoint.
    recording: bool = False
    recording_store: str = ""
    recording_s3_endpoint: str = ""
    recording_s3_access_key: str = ""
    recording_s3_secret_key: str = field(default="", repr=False)
    recording_s3_region: str = "us-east-1"
    recording_retention_days: float = 30.0
    # Where `voicestack retention / export / erase` append their audit lines (JSON, one a line).
    recording_audit_log: str = ""
    consent_text: str = "This call can be recorded. Do you agree to be recorded?"
    consent_yes_text: str = "Thank you. This call is being recorded."
    consent_no_text: str = "All right, this call will not be recorded."
    # Web gateway (`serve web`, web/gateway.py): the edge it bridges to, and TLS to it (a CA
    # file turns TLS on; with a cert and key, mTLS).
    web_edge_address: str = "127.0.0.1:50051"
    web_edge_ca_file: str = ""
    web_edge_cert_file: str = ""
    web_edge_key_file: str = ""
    # Its HTTP listener; HTTPS with a cert and key (browsers allow the microphone only on
    # https:// or localhost).
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    web_tls_cert_file: str = ""
    web_tls_key_file: str = ""
    # Calls one web gateway takes at once (more get 503), and the life of a /token token.
    web_capacity: int = 20
    web_token_ttl_seconds: float = 60.0
    # Comma-separated STUN/TURN URLs for both ends ("" = host candidates only: one host or a
    # flat network; behind NAT give a TURN server).
    web_ice_servers: str = ""
    # Origins besides the gateway's own that may ask for tokens (comma-separated).
    web_allowed_origins: str = ""
    # SIP gateway (`serve sip`, sip/gateway.py): its listener, "udp", "tcp" or both.
    sip_host: str = "127.0.0.1"
    sip_port: int = 5060
    sip_transports: str = "udp,tcp"
    # The address put in Contact and SDP: the one callers reach ("" = sip_host, or for
    # 0.0.0.0 the local address the INVITE arrived on).
    sip_public_host: str = ""
    # The edge it bridges calls to, and its CA (TLS; with a cert and key, mTLS).
    sip_edge_address: str = "127.0.0.1:50051"
    sip_edge_ca_file: str = ""
    sip_edge_cert_file: str = ""
    sip_edge_key_file: str = ""
    # RTP: an even port per call (RTCP on the next) from LOW-HIGH.
    sip_rtp_ports: str = "10000-10100"
    # Calls at once; past it INVITEs get sip_busy_code (486, 503 or 600).
    sip_capacity: int = 20
    sip_busy_code: int = 486
    # Digest auth of INVITEs (both set = on; MD5 or SHA-256).
    sip_username: str = ""
    sip_password: str = field(default="", repr=False)
    sip_realm: str = "voicestack"
    # No RTP from the caller this long ends the call (0 = never); the edge must start the
    # session within sip_answer_timeout_seconds or the INVITE gets 503.
    sip_rtp_timeout_seconds: float = 60.0
    sip_answer_timeout_seconds: float = 15.0
    # Each call's session ("" = the edge's defaults).
    sip_system_prompt: str = ""
    sip_greeting: str = ""
    sip_voice: str = ""
    # Offer the agent end_call (the gateway then sends BYE after its goodbye).
    sip_end_call: bool = True
    # Benchmarks only: trivial engines (no models) so the edge and the bus are the
    # bottleneck being measured. Never evidence that the pipeline works.
    cheap_engines: bool = False
    log_level: str = "INFO"

    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


def cpu_share(cgroup: str = "/sys/fs/cgroup") -> int:
    """Cores this process may use: its container's CPU limit (cgroup v2 cpu.max, or v1's
    quota), rounded up, else the CPUs it may run on. A model's thread pool sized to the
    node's cores in a pod limited to 2 of them would only thrash."""
    cpus = len(os.sched_getaffinity(0))
    for quota_file, period_file in ((f"{cgroup}/cpu.max", None),
                                    (f"{cgroup}/cpu/cpu.cfs_quota_us", f"{cgroup}/cpu/cpu.cfs_period_us")):
        try:
            with open(quota_file) as f:
                fields_ = f.read().split()
            if period_file:
                with open(period_file) as f:
                    fields_ += f.read().split()
        except OSError:
            continue
        if len(fields_) >= 2 and fields_[0] not in ("max", "-1"):
            return max(1, min(cpus, -(-int(fields_[0]) // int(fields_[1]))))
        break
    return cpus


def _coerce(kind: type, raw: str, name: str):
    try:
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        return kind(raw)
    except ValueError:
        raise SystemExit(f"config: {name}={raw!r} is not a valid {kind.__name__}") from None


def load_settings(service: str, overrides: dict | None = None, environ=os.environ) -> Settings:
    """Settings for one service: defaults, then VOICESTACK_* env, then non-None overrides."""
    settings = Settings()
    types = {f.name: type(getattr(settings, f.name)) for f in fields(Settings)}
    for name, kind in types.items():
        env = f"VOICESTACK_{name.upper()}"
        if env in environ:
            setattr(settings, name, _coerce(kind, environ[env], env))
    for name, value in (overrides or {}).items():
        if value is not None and name in types:
            setattr(settings, name, value)
    # Per-service defaults fill whatever nobody set (a gateway has its own web_*/sip_* ones).
    if settings.grpc_port == 0:
        settings.grpc_port = DEFAULT_GRPC_PORTS.get(service, 0)
    if settings.metrics_port == -1:
        settings.metrics_port = DEFAULT_METRICS_PORTS.get(service, 0)
    if settings.capacity <= 0:
        settings.capacity = DEFAULT_CAPACITY.get(service, 0)
    if not settings.replica_id:
        settings.replica_id = f"{service}-{os.uname().nodename}-{os.getpid()}"
    return settings


def add_flags(parser) -> None:
    """One --flag per Settings field, default None so env and defaults show through."""
    for f in fields(Settings):
        kind = type(getattr(Settings(), f.name))
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const=True, default=None, metavar="BOOL",
                                type=lambda raw: _coerce(bool, raw, flag))
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper())


def flag_overrides(args) -> dict:
    return {f.name: getattr(args, f.name, None) for f in fields(Settings)}


def edge_api_key(environ=os.environ) -> str:
    """The API key a client of the edge sends (`talk`, the gateways): VOICESTACK_API_KEY only,
    never a flag (flags show in `ps`) and never a Settings field (so never in a log)."""
    return environ.get("VOICESTACK_API_KEY", "").strip()


SECRETS = ("llm_api_key", "recording_s3_secret_key", "sip_password")


def public_view(settings: Settings) -> dict:
    """Settings safe to log: secrets masked."""
    view = dataclasses.asdict(settings)
    for secret in SECRETS:
        if view[secret]:
            view[secret] = "***"
    return view
