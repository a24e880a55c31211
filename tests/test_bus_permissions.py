"""A bus no bystander can read: NATS users and permissions per role (bus_permissions.py)
on a real nats-server, as `voicestack up` runs it (launcher.Stack, permissions on by
default), over TLS too, and a conversation through the five services with them on.

Every refusal is checked twice: the server says so (a Permissions or Authorization
Violation), and what the refused client would have read is published while it listens,
with a control client allowed to read it receiving it, so a test that saw nothing because
nothing was sent cannot pass. The chart's rendered config runs the same checks
(tests/test_chart_nats.py imports PermissionProbe from here).
"""

from __future__ import annotations

import asyncio
import stat
import subprocess

import nats
import nats.errors
import numpy as np
import pytest

from conftest import silence, speak, words
from voicestack import bus_permissions, discovery
from voicestack.bus import TTS_VOICES_SUBJECT, open_subject, overflow_subject, queue_group, stream_subject
from voicestack.client import converse
from voicestack.config import load_settings
from voicestack.launcher import Stack

REFUSED = (nats.errors.Error, OSError, asyncio.TimeoutError)


class PermissionProbe:
    """Clients of one bus, each as a role (or as nobody), and what the server told them."""

    def __init__(self, url: str, options_for, roles=bus_permissions.ROLES):
        self.url = url
        self.options_for = options_for  # role -> nats.connect keyword arguments (credentials, TLS)
        self.roles = roles  # the roles this bus has users for
        self.clients = []

    async def connect(self, role: str | None, **overrides):
        violations: list[str] = []

        async def on_error(exc):
            violations.append(str(exc))

        options = {**(self.options_for(role) if role else self.options_for(None)), **overrides}
        nc = await nats.connect(servers=self.url.split(","), allow_reconnect=False, max_reconnect_attempts=0,
                                connect_timeout=2.0, error_cb=on_error, **options)
        nc.violations = violations
        self.clients.append(nc)
        return nc

    async def refused_connect(self, role: str | None, **overrides) -> str:
        """Connect and expect the server to refuse; the reason it gave."""
        with pytest.raises(REFUSED) as refused:
            nc = await self.connect(role, **overrides)
            await nc.flush(timeout=2)  # (the server's -ERR may come after CONNECT)
        return f"{type(refused.value).__name__}: {refused.value}"

    async def listen(self, nc, subject: str, queue: str = "") -> asyncio.Queue:
        received: asyncio.Queue = asyncio.Queue()
        await nc.subscribe(subject, queue=queue, cb=received.put)
        await nc.flush(timeout=2)
        await asyncio.sleep(0.05)  # a refusal is an async -ERR: let it arrive
        return received

    async def close(self) -> None:
        for nc in self.clients:
            if not nc.is_closed:
                await nc.close()
        self.clients = []


async def wait_violation(nc, text: str, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not any(text.lower() in v.lower() for v in nc.violations):  # (nats-py lowercases them)
        assert asyncio.get_running_loop().time() < deadline, f"no {text!r} from the server: {nc.violations}"
        await asyncio.sleep(0.02)


async def received_nothing(queue: asyncio.Queue, wait: float = 0.3) -> bool:
    await asyncio.sleep(wait)
    return queue.empty()


async def received_one(queue: asyncio.Queue, timeout: float = 2.0):
    return await asyncio.wait_for(queue.get(), timeout)


# ----------------------------------------------------------------- the checks (any bus)


async def check_no_credentials_refused(probe: PermissionProbe) -> None:
    """(a) No credentials, or wrong ones: not even a connection."""
    assert "uthorization" in await probe.refused_connect(None)
    assert "uthorization" in await probe.refused_connect("stt", password="not-the-password")
    assert "uthorization" in await probe.refused_connect("stt", user="nobody")
    # Control: the same server takes a role's own credentials.
    nc = await probe.connect("stt")
    assert nc.is_connected


async def check_stage_cannot_read_another_stages_traffic(probe: PermissionProbe) -> None:
    """(b) A TTS replica's credentials: no other stage's audio, transcripts or replies, no
    edge inbox, not the whole bus, no other stage's queue group."""
    edge, stt, tts = await probe.connect("edge"), await probe.connect("stt"), await probe.connect("tts")
    stolen = {}
    for subject in ("vs.>", "_INBOX.>", ">", stream_subject("vad", "*", "*"), stream_subject("stt", "*", "*"),
                    stream_subject("llm", "*", "*"), stream_subject("llm-strong", "*", "*"),
                    bus_permissions.inbox_prefix("edge") + ".>", bus_permissions.inbox_prefix("status") + ".>"):
        stolen[subject] = await probe.listen(tts, subject)
        await wait_violation(tts, f'Subscription to "{subject}"')
    allowed_stt = await probe.listen(stt, stream_subject("stt", "r1", "*"))  # the control: the STT's own
    allowed_edge = await probe.listen(edge, bus_permissions.inbox_prefix("edge") + ".*")

    # The edge feeds an STT stream (audio in); the STT answers on the edge's inbox (transcript out).
    await edge.publish(stream_subject("stt", "r1", "s1"), b"audio")
    await stt.publish(bus_permissions.inbox_prefix("edge") + ".s1", b"transcript")
    assert (await received_one(allowed_stt)).data == b"audio"
    assert (await received_one(allowed_edge)).data == b"transcript"
    for subject, queue in stolen.items():
        assert await received_nothing(queue, 0.1), f"a TTS replica read {subject}"

    # Another stage's queue group: the TTS cannot join the STT's, so an open for the STT
    # goes unanswered while only the impostor listens...
    impostor = await probe.listen(tts, open_subject("stt"), queue=queue_group("stt"))
    await wait_violation(tts, f'Subscription to "{open_subject("stt")}"')
    with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
        await edge.request(open_subject("stt"), b"open", timeout=0.5)
    assert await received_nothing(impostor, 0.1)
    # ... and is answered once the STT's own replica is in its group (the control).
    replica = await probe.connect("stt")

    async def answer(msg):
        await msg.respond(b"stt here")

    await replica.subscribe(open_subject("stt"), queue=queue_group("stt"), cb=answer)
    await replica.flush()
    for attempt in range(3):
        # (nats-server 2.9 now and then answers "no responders" to a publisher that just heard
        # it, for a moment after the first subscriber came; permissions or not)
        try:
            assert (await edge.request(open_subject("stt"), b"open", timeout=2)).data == b"stt here"
            break
        except nats.errors.NoRespondersError:
            if attempt == 2:
                raise
            await asyncio.sleep(0.1)
    assert not replica.violations

    # Nor can it speak for the edge: open streams on, or write audio into, another stage.
    listening = await probe.listen(stt, "vs.stt.>")
    for subject in (open_subject("stt"), overflow_subject("stt"), stream_subject("stt", "r1", "s1")):
        await tts.publish(subject, b"forged")
        await wait_violation(tts, f'Publish to "{subject}"')
    assert await received_nothing(listening)
    # A stage has no business asking another for anything (the TTS voices are the edge's to ask).
    await stt.publish(TTS_VOICES_SUBJECT, b"")
    await wait_violation(stt, f'Publish to "{TTS_VOICES_SUBJECT}"')


async def check_status_reads_only_the_service_api(probe: PermissionProbe) -> None:
    """(c) `voicestack status`' credentials: $SRV.> answers, nothing else."""
    stt, status = await probe.connect("stt"), await probe.connect("status")

    class Replica:
        name = "stt"

        @staticmethod
        def snapshot():
            return {"stage": "stt", "replica_id": "stt-probe", "active": 0, "capacity": 1}

    announcement = await discovery.announce(stt, Replica())
    await stt.flush()  # its subscriptions are on the server before the status reader asks
    try:
        replicas = await discovery.discover(status, timeout=2.0)
        assert [r["replica_id"] for r in replicas] == ["stt-probe"]
        assert not stt.violations and not status.violations, (stt.violations, status.violations)
    finally:
        await announcement.stop()
    edge = await probe.connect("edge")
    for subject in ("vs.>", "_INBOX.>", bus_permissions.inbox_prefix("edge") + ".>", "$SRV.>"):
        queue = await probe.listen(status, subject)
        await wait_violation(status, f'Subscription to "{subject}"')
        await edge.publish(bus_permissions.inbox_prefix("edge") + ".x", b"reply")
        assert await received_nothing(queue, 0.1), f"status read {subject}"
    await status.publish(open_subject("stt"), b"open")
    await wait_violation(status, f'Publish to "{open_subject("stt")}"')


async def check_every_role_has_exactly_its_inbox(probe: PermissionProbe) -> None:
    """Only the edge and the status reader ask questions, each under its own inbox prefix:
    the stages' answers to the edge never reach the status reader or a stage, and a stage,
    which asks nothing, reads no inbox at all."""
    asking = ("edge", "status")
    for role in probe.roles:
        nc = await probe.connect(role)
        assert nc.new_inbox().startswith(bus_permissions.inbox_prefix(role) + "."), nc.new_inbox()
        for other in asking:
            subject = bus_permissions.inbox_prefix(other) + ".>"
            before = len(nc.violations)
            await probe.listen(nc, subject)
            if other == role:
                assert nc.violations[before:] == [], (role, nc.violations)
            else:
                await wait_violation(nc, f'Subscription to "{subject}"')
        if role not in asking:
            await probe.listen(nc, bus_permissions.inbox_prefix(role) + ".>")
            await wait_violation(nc, f'Subscription to "{bus_permissions.inbox_prefix(role)}.>"')


CHECKS = (check_no_credentials_refused, check_stage_cannot_read_another_stages_traffic,
          check_status_reads_only_the_service_api, check_every_role_has_exactly_its_inbox)


async def run_all(probe: PermissionProbe) -> None:
    """Every check, each on fresh connections; the probe closed after."""
    try:
        for check in CHECKS:
            await check(probe)
            await probe.close()
    finally:
        await probe.close()


# ----------------------------------------------------------------- the embedded default


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A nats-server as `voicestack up` starts it: users and permissions on (the default)."""
    with Stack(ports="free", log_dir=tmp_path_factory.mktemp("nats-permissions")) as stack:
        stack.start_nats()
        yield stack


def stack_options(stack: Stack):
    def options(role):
        if role is None:  # TLS still, where the stack has it, but no user
            return {key: value for key, value in stack.nats_options("status").items()
                    if key not in ("user", "password", "inbox_prefix")}
        return stack.nats_options(role)
    return options


@pytest.fixture
async def probe(secured):
    checks = PermissionProbe(secured.nats_url, stack_options(secured))
    yield checks
    await checks.close()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_the_embedded_bus(probe, check):
    await check(probe)


def test_the_credentials_are_private_and_the_config_holds_no_secret(secured):
    directory = secured.credentials.directory
    assert directory == bus_permissions.local_dir(secured.nats_port)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(p.name for p in directory.iterdir())
    assert files == sorted([f"{role}.password" for role in bus_permissions.ROLES] + ["nats.conf"])
    config = (directory / "nats.conf").read_text()
    assert config == bus_permissions.server_config()
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for role in bus_permissions.ROLES:
        password = secured.credentials.password(role)
        assert len(password) >= 24 and password not in config
        assert f"${bus_permissions.password_variable(role)}" in config
    assert len({secured.credentials.password(r) for r in bus_permissions.ROLES}) == len(bus_permissions.ROLES)
    # The server's own log names no password either.
    log = (secured.log_dir / "nats.log").read_text()
    assert not any(secured.credentials.password(r) in log for r in bus_permissions.ROLES)


def test_an_open_bus_is_still_possible_and_reads_everything(tmp_path):
    """nats_auth=False (a bare server, as some tests want) has no users: the control that
    shows the refusals above come from the permissions."""
    async def read_all(url):
        nc = await nats.connect(url)
        queue = asyncio.Queue()
        await nc.subscribe("vs.>", cb=queue.put)
        await nc.flush()
        await nc.publish(stream_subject("stt", "r", "s"), b"audio")
        message = await received_one(queue)
        await nc.close()
        return message.data

    with Stack(ports="free", nats_auth=False) as open_stack:
        open_stack.start_nats()
        assert open_stack.credentials is None and open_stack.role_env("stt") == {}
        assert asyncio.run(read_all(open_stack.nats_url)) == b"audio"


def test_status_finds_the_local_credentials_and_services_get_their_roles(secured):
    settings = load_settings("status", {"nats_url": secured.nats_url}, environ={})
    options = bus_permissions.connect_options(settings, role="status")
    assert options["user"] == "status" and options["inbox_prefix"] == "_INBOX.status"
    assert options["password"] == secured.credentials.password("status")
    # Elsewhere (another port, another host) there is nothing to find.
    for url in ("nats://127.0.0.1:1", "nats://nats.nats.svc:4222"):
        assert "user" not in bus_permissions.connect_options(load_settings("status", {"nats_url": url}, environ={}),
                                                             role="status")
    # What each service process is given: its own role's user and password file, nothing more.
    from voicestack.launcher import nats_role
    assert [nats_role(s, a, {}) for s, a in [("edge", []), ("stt", []), ("llm", []),
                                             ("llm", ["--llm-pool", "llm-strong"])]] == \
        ["edge", "stt", "llm", "llm-strong"]
    assert nats_role("llm", [], {"VOICESTACK_LLM_POOL": "llm-strong"}) == "llm-strong"
    env = secured.role_env("tts")
    assert env == {"VOICESTACK_NATS_USER": "tts",
                   "VOICESTACK_NATS_PASSWORD_FILE": str(secured.credentials.password_file("tts"))}


def test_the_credentials_leave_with_the_stack(tmp_path):
    stack = Stack(ports="free")
    stack.start_nats()
    directory = stack.credentials.directory
    assert directory.is_dir()
    stack.stop_all()
    assert not directory.exists()


# ----------------------------------------------------------------- TLS on the bus


@pytest.fixture(scope="module")
def nats_certs(tmp_path_factory) -> dict:
    """A test CA and a server certificate for 127.0.0.1/localhost (openssl CLI)."""
    d = tmp_path_factory.mktemp("nats-certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=voicestack NATS CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=voicestack NATS")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "2", "-subj", "/CN=other CA")
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "other.pem")}


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory, nats_certs):
    env = {"VOICESTACK_NATS_TLS_CERT_FILE": str(nats_certs["server.pem"]),
           "VOICESTACK_NATS_TLS_KEY_FILE": str(nats_certs["server.key"]),
           "VOICESTACK_NATS_CA_FILE": str(nats_certs["ca.pem"])}
    with Stack(ports="free", log_dir=tmp_path_factory.mktemp("nats-tls"), env=env) as stack:
        stack.start_nats()
        yield stack


async def test_the_bus_over_tls_keeps_the_permissions(tls_stack):
    assert tls_stack.nats_url.startswith("tls://")
    await run_all(PermissionProbe(tls_stack.nats_url, stack_options(tls_stack)))


async def test_the_bus_over_tls_refuses_plaintext_and_unknown_servers(tls_stack, nats_certs):
    import ssl

    plain = tls_stack.nats_url.replace("tls://", "nats://")
    with pytest.raises(REFUSED):  # no TLS: the server requires it
        nc = await nats.connect(plain, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2.0,
                                **{k: v for k, v in tls_stack.nats_options("stt").items() if k != "tls"})
        await nc.close()
    with pytest.raises(REFUSED):  # a client trusting another CA does not talk to this server
        nc = await nats.connect(tls_stack.nats_url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2.0,
                                **{**tls_stack.nats_options("stt"),
                                   "tls": ssl.create_default_context(cafile=str(nats_certs["other.pem"]))})
        await nc.close()
    nc = await nats.connect(tls_stack.nats_url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2.0,
                            **tls_stack.nats_options("stt"))  # the control: its CA, its credentials
    assert nc.is_connected and nc.connected_url.scheme == "tls"
    await nc.close()


# ----------------------------------------------------------------- the five services, permissions on


async def test_a_conversation_runs_with_permissions_on_and_a_bystander_reads_nothing(stack, speech_dir):
    """The session stack of the other real-process tests runs with the permissions (the
    launcher's default): a question is answered, while a client with no credentials is
    refused and one with the TTS's credentials, listening on everything it may try, reads
    no audio, transcript or reply of the call."""
    assert stack.credentials is not None
    probe = PermissionProbe(stack.nats_url, stack_options(stack))
    try:
        await probe.refused_connect(None)
        tts = await probe.connect("tts")
        stolen = {}
        for subject in ("vs.>", "_INBOX.>", "vs.stt.>", "vs.vad.>", "vs.llm.>", "vs.edge.>",
                        bus_permissions.inbox_prefix("edge") + ".>"):
            stolen[subject] = await probe.listen(tts, subject)
            await wait_violation(tts, f'Subscription to "{subject}"')
        status = await probe.connect("status")
        stages = {r["stage"] for r in await discovery.discover(status, timeout=2.0)}
        assert {"edge", "vad", "stt", "llm", "tts"} <= stages

        question = np.concatenate([silence(300), speak("What is the capital of France?", speech_dir)])
        conversation = await converse(stack.processes["edge"].address, question, timeout=90)
        assert conversation.status.name == "OK", conversation.details
        [turn] = conversation.replies
        assert {"capital", "france"} <= set(words(turn.transcript)), turn.transcript
        assert turn.reply_text.strip() and len(turn.audio) > 0
        for subject, queue in stolen.items():
            assert queue.empty(), f"a TTS replica's credentials read {subject} during a call"
    finally:
        await probe.close()
    # No service was refused anything it does (their logs would say Permissions Violation).
    for process in stack.processes.values():
        log = process.log_path.read_text(errors="replace") if process.log_path else ""
        assert "Violation" not in log, f"{process.name}: " + next(l for l in log.splitlines() if "Violation" in l)


def test_the_permission_model_is_the_one_definition():
    """Every role's lists are what bus_permissions says, and no role may read the whole
    bus: a change that widens one fails here and in the chart's test."""
    for role in bus_permissions.ROLES:
        allowed = bus_permissions.permissions(role)
        for wide in (">", "vs.>", "_INBOX.>", "vs.*.>", "*.>"):
            assert wide not in allowed["subscribe"], (role, wide)
    for stage in bus_permissions.STAGE_ROLES:
        assert all(s.startswith(f"vs.{stage}.") or s.startswith("$SRV.")
                   for s in bus_permissions.permissions(stage)["subscribe"]), stage
    assert bus_permissions.permissions("status") == {"publish": ["$SRV.>"], "subscribe": ["_INBOX.status.>"]}
    config = bus_permissions.server_config()
    assert config.count("{user: ") == len(bus_permissions.ROLES)
