"""Who may do what on the bus: one NATS user per role, each with allow lists.

The one definition of the bus's permissions. `voicestack up` (launcher.Stack) writes a
nats-server config from it; the chart renders the same config from
charts/voicestack/files/nats-permissions.json, which is this module's output
(`python -m voicestack.bus_permissions --json`; a test keeps them equal), and
`--official-chart-values` prints the values for the official NATS chart.

Roles (the NATS user names; every user is in the account VOICESTACK):

  edge        opens stage streams and feeds them: publishes to each stage's open,
              overflow and stream subjects and asks the TTS for its voices; reads
              only its own inbox (_INBOX.edge.>), where the stages answer.
  <stage>     vad, stt, llm, llm-strong, tts: reads only its own subjects
              (vs.<stage>.>: its queue group, its affinity and overflow opens, its
              streams' inputs, its status endpoint) and publishes only to the
              edge's inbox (stream outputs, open answers) and the status reader's.
  status      `voicestack status`: publishes only to $SRV.> (the NATS service API)
              and reads only its own inbox (_INBOX.status.>).

Every service also answers the NATS service API for its own name ($SRV.PING,
$SRV.INFO, $SRV.STATS and $SRV.<verb>.voicestack-<role>[.<id>]). Nobody else can
connect: a client without a role's credentials is refused (Authorization Violation),
and what a role is not allowed is refused by the server (Permissions Violation).

Each role's inbox is its own prefix: a process connects with inbox_prefix
`_INBOX.<role>` (inbox_prefix()), so the permissions can tell the edge's replies from
the status reader's. Passwords are never in a config file: the server config refers to
them as environment variables ($VOICESTACK_NATS_PASSWORD_<ROLE>), and each process reads
its own from a file (VOICESTACK_NATS_USER, VOICESTACK_NATS_PASSWORD_FILE).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

from voicestack.bus import TTS_VOICES_SUBJECT, open_subject, overflow_subject, stream_subject
from voicestack.config import STAGES

ACCOUNT = "VOICESTACK"
# The stages' subjects: the LLM's strong pool has subjects of its own (llm/__init__.py POOLS).
STAGE_ROLES = (*STAGES[:3], "llm-strong", *STAGES[3:])  # vad, stt, llm, llm-strong, tts
SERVICE_ROLES = ("edge", *STAGE_ROLES)
ROLES = (*SERVICE_ROLES, "status")
MICRO_PREFIX = "$SRV"
MICRO_SERVICE_PREFIX = "voicestack-"  # discovery.SERVICE_PREFIX (not imported: discovery pulls in nats.micro)


def inbox_prefix(role: str) -> str:
    """The inbox prefix a role's process connects with; only that role reads under it."""
    return f"_INBOX.{role}"


def password_variable(role: str) -> str:
    """The environment variable the server config takes a role's password from."""
    return "VOICESTACK_NATS_PASSWORD_" + role.upper().replace("-", "_")


def _micro(role: str) -> list[str]:
    """What nats.micro subscribes for one service of this role (discovery.announce)."""
    name = MICRO_SERVICE_PREFIX + role
    return [f"{MICRO_PREFIX}.PING", f"{MICRO_PREFIX}.INFO", f"{MICRO_PREFIX}.STATS",
            f"{MICRO_PREFIX}.*.{name}", f"{MICRO_PREFIX}.*.{name}.*"]


def permissions(role: str) -> dict:
    """{"publish": [...], "subscribe": [...]}: the subjects `role` may use, nothing else."""
    answers = [inbox_prefix("status") + ".>"]  # the service API's answers to `voicestack status`
    if role == "edge":
        publish = []
        for stage in STAGE_ROLES:
            publish += [open_subject(stage), open_subject(stage, ">"), overflow_subject(stage),
                        stream_subject(stage, "*", "*").removesuffix(".*.*") + ".>"]
        publish += [TTS_VOICES_SUBJECT, *answers]
        subscribe = [inbox_prefix("edge") + ".>", *_micro("edge"), "vs.edge.>"]
    elif role in STAGE_ROLES:
        publish = [inbox_prefix("edge") + ".>", *answers]
        subscribe = [f"vs.{role}.>", *_micro(role)]
    elif role == "status":
        publish = [f"{MICRO_PREFIX}.>"]
        subscribe = [inbox_prefix("status") + ".>"]
    else:
        raise ValueError(f"no NATS role {role!r}; the roles: {', '.join(ROLES)}")
    return {"publish": publish, "subscribe": subscribe}


def definition() -> dict:
    """The whole model as data: what the chart reads (files/nats-permissions.json)."""
    return {"account": ACCOUNT,
            "roles": [{"role": role, "passwordVariable": password_variable(role), **permissions(role)}
                      for role in ROLES]}


def _compact(value) -> str:
    # The chart renders the same JSON with Helm's toRawJson (sorted keys, no spaces).
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def server_config(roles=ROLES) -> str:
    """The nats-server config block of accounts, users and permissions (no secrets: each
    password is a $VARIABLE the server takes from its environment), for `roles` (the chart
    has users only for the stages it deploys). The chart's templates/_nats.tpl renders
    exactly this text."""
    lines = ["# voicestack: one NATS user per role, allow lists only (voicestack/bus_permissions.py)",
             "accounts: {", f"  {ACCOUNT}: {{", "    users: ["]
    for role in definition()["roles"]:
        if role["role"] not in roles:
            continue
        allow = {"publish": {"allow": role["publish"]}, "subscribe": {"allow": role["subscribe"]}}
        lines.append(f'      {{user: {_compact(role["role"])}, password: ${role["passwordVariable"]}, '
                     f"permissions: {_compact(allow)}}}")
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)


def official_chart_values(secret_name: str = "voicestack-nats-users") -> dict:
    """Values for the official NATS chart (nats-io/k8s, 1.x): the same users and
    permissions through its config.merge (`<< $VAR >>` is written unquoted, so the server
    reads the variable), the passwords from `secret_name` (one key per role) as its
    container's environment."""
    users = [{"user": role["role"], "password": f"<< ${role['passwordVariable']} >>",
              "permissions": {"publish": {"allow": role["publish"]}, "subscribe": {"allow": role["subscribe"]}}}
             for role in definition()["roles"]]
    env = {role["passwordVariable"]: {"valueFrom": {"secretKeyRef": {"name": secret_name, "key": role["role"]}}}
           for role in definition()["roles"]}
    return {"config": {"merge": {"accounts": {ACCOUNT: {"users": users}}}}, "container": {"env": env}}


# ------------------------------------------------------------------ local credentials


def local_dir(port: int) -> Path:
    """Where `voicestack up` keeps the credentials of its nats-server on `port`: private to
    this user (0700, files 0600), so `voicestack status` on this machine finds them."""
    base = os.environ.get("XDG_RUNTIME_DIR") or str(Path.home() / ".local" / "state")
    return Path(base) / "voicestack" / f"nats-{port}"


class LocalCredentials:
    """Generated passwords, one per role, in a private directory: `<role>.password`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def create(self) -> LocalCredentials:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        for role in ROLES:
            path = self.password_file(role)
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(new_password() + "\n")
        return self

    def password_file(self, role: str) -> Path:
        return self.directory / f"{role}.password"

    def password(self, role: str) -> str:
        return read_password(str(self.password_file(role)))

    def exists(self) -> bool:
        return all(self.password_file(role).is_file() for role in ROLES)

    def server_env(self) -> dict:
        """The nats-server's environment: every role's password, as server_config() names them."""
        return {password_variable(role): self.password(role) for role in ROLES}

    def client_env(self, role: str) -> dict:
        """A process's environment for `role` (config.Settings: nats_user, nats_password_file)."""
        return {"VOICESTACK_NATS_USER": role, "VOICESTACK_NATS_PASSWORD_FILE": str(self.password_file(role))}

    def remove(self) -> None:
        for role in ROLES:
            self.password_file(role).unlink(missing_ok=True)
        (self.directory / "nats.conf").unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass


def new_password() -> str:
    """A random password the server's config reads as a string: nats-server parses a
    $VARIABLE's value as config, so it must start with a letter and hold only letters and
    digits (the chart's are made the same way: "vs" + randAlphaNum)."""
    return "vs" + secrets.token_hex(24)


def read_password(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def local_credentials_for(nats_url: str) -> LocalCredentials | None:
    """The credentials `voicestack up` made for a nats-server on this machine at `nats_url`
    (its first URL, on a loopback address), if there are any."""
    first = next((u.strip() for u in nats_url.split(",") if u.strip()), "")
    parts = urlsplit(first if "://" in first else "nats://" + first)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    credentials = LocalCredentials(local_dir(parts.port or 4222))
    return credentials if credentials.exists() else None


def connect_options(settings, role: str | None = None) -> dict:
    """nats.connect() keyword arguments for a process's credentials and TLS: its
    user and password file (inbox prefix `_INBOX.<user>` unless nats_inbox_prefix
    says), or a .creds file, and the CA of the servers' certificates. `role`: the
    credentials `voicestack up` made on this machine, when the settings name none."""
    options: dict = {}
    user, password_file = settings.nats_user, settings.nats_password_file
    if not user and not settings.nats_creds_file and role:
        local = local_credentials_for(settings.nats_url)
        if local is not None:
            user, password_file = role, str(local.password_file(role))
    if settings.nats_creds_file:
        options["user_credentials"] = settings.nats_creds_file
    if user:
        options["user"] = user
        options["password"] = read_password(password_file) if password_file else ""
    prefix = settings.nats_inbox_prefix or (inbox_prefix(user) if user else "")
    if prefix:
        options["inbox_prefix"] = prefix
    if settings.nats_ca_file:
        import ssl

        options["tls"] = ssl.create_default_context(cafile=settings.nats_ca_file)
    return options


OFFICIAL_CHART_HEADER = """\
# Values for the official NATS chart (nats-io/k8s, 1.x): the bus's users and permissions per role,
# the passwords from the Secret named below (keys: the roles), which must exist in the NATS release's
# namespace. Made by `python -m voicestack.bus_permissions --official-chart-values [SECRET_NAME]`
# (charts/voicestack/files/official-nats-chart-values.yaml is its output for the default name).
# Merge with your own values: helm install nats nats/nats -f THIS_FILE -f yours.yaml
"""


def main(argv: list[str]) -> int:
    if argv == ["--json"]:
        print(json.dumps(definition(), indent=2))
    elif argv == ["--server-config"]:
        print(server_config(), end="")
    elif argv[:1] == ["--official-chart-values"] and len(argv) <= 2:
        import yaml

        print(OFFICIAL_CHART_HEADER + yaml.safe_dump(official_chart_values(*argv[1:]), sort_keys=False), end="")
    else:
        print("usage: python -m voicestack.bus_permissions --json | --server-config | "
              "--official-chart-values [SECRET_NAME]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
