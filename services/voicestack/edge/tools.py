"""The edge's tool catalog: which tools a session's LLM is offered, checked before any runs.

A tool is one of four kinds (ToolSpec.kind):
  client   the session's own (ToolsConfig.client_tools): the client runs it (ToolCall out,
           ToolResult back; the turn logic does that, this module only checks them)
  http     an operator's HTTP endpoint, from the tools file
  mcp      a tool of an operator's MCP server (streamable HTTP), from the tools file
  builtin  end_call (the turn logic hangs up after the goodbye)

Interface (what the turn logic calls):

  ServerTools.start(settings) -> ServerTools    once per edge process; aclose() at the end.
      Reads settings.tools_file, refuses (SystemExit, naming the tool and the host) any URL
      whose host settings.tools_allowed_hosts does not allow, and lists each MCP server's
      tools once. names() (grows when a server unreachable at start answers), spec(name),
      missing_servers(); call(name, arguments) -> str runs an HTTP or MCP tool within its
      timeout with arguments already checked (SessionTools.arguments), or raises ToolFailed;
      a result is cut at MAX_RESULT_CHARS. ServerTools() is an empty catalog (tests).
  SessionTools.from_config(tools_config, server) -> SessionTools    at session start;
      raises voicestack.errors.invalid() (INVALID_ARGUMENT) naming the tool.
      definitions() what the LLM is offered; spec(name); arguments(call) -> dict (parsed and
      checked against the tool's schema, or ToolFailed); filler, filler_ms, max_rounds
      (defaults applied); server (the ServerTools, for call()).
  ToolFailed(tool, reason)    .timed_out is set for a timeout; the reason never holds a
      secret (header values from the environment are masked wherever they could appear).

Decisions worth knowing:
  - Hosts: an HTTP tool or MCP server URL must use a host tools_allowed_hosts allows
    ("name", "*.suffix" for its subdomains, "*" for any). Empty allows none: header
    secrets go only where an operator said twice that they may. URL placeholders fill the
    path and query only (URL-encoded), never the host, so an argument (the caller's words,
    through the LLM) cannot point a request and its secrets elsewhere. Redirects are not
    followed, for the same reason.
  - MCP tools are offered under their own names (what their authors wrote for an LLM);
    a server's optional `prefix` renames them. Tool names are one namespace: the first
    definition in file order wins (HTTP tools first, then servers in order); a later
    duplicate, or one named end_call, is skipped with an error in the log (two HTTP tools
    with one name stop the edge: that is a typo in one file).
  - An MCP server that cannot be reached at start is logged and skipped, and its listing
    is retried in the background until it answers (then its tools join the catalog for
    sessions that start afterwards). Failing the edge instead would make every call
    depend on each tool backend: a CRM outage would stop new edge pods, autoscaling
    included. A session that names a tool of a server not yet listed gets INVALID_ARGUMENT
    (the message says which servers are missing).
  - A broken MCP connection (the server restarted) fails the call it broke and is
    reopened by the next call; a call is never retried, since a tool may not be idempotent.
  - Schemas are checked with the validator of their own draft ($schema; 2020-12 when
    absent), and $ref must be local: jsonschema would otherwise fetch a remote $ref from a
    client's schema, inside the cluster. A client tool's `pattern` keywords are not
    enforced: a client-written regex must not be able to stall the edge's event loop
    (catastrophic backtracking), and the client checks its own arguments when it runs them.
    (Regexes in patternProperties still run, on argument names only.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import httpx
import jsonschema
import jsonschema.exceptions
import jsonschema.validators
import referencing
import yaml

from voicestack.config import Settings
from voicestack.errors import invalid
from voicestack.v1 import edge_pb2, tools_pb2

log = logging.getLogger(__name__)

END_CALL = "end_call"
END_CALL_DEFINITION = tools_pb2.ToolDefinition(
    name=END_CALL,
    description="End the phone call. Say goodbye first; call this when the caller wants to hang up "
                "or the conversation is complete.",
    parameters_json=json.dumps({
        "type": "object",
        "properties": {"reason": {"type": "string", "description": "Why the call ends, in a few words."}},
        "additionalProperties": False,
    }),
)

# The OpenAI function-name rule, which vLLM and llama.cpp follow.
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_DESCRIPTION_CHARS = 1024  # OpenAI's limit on a function description
MAX_SCHEMA_CHARS = 16384
MAX_CLIENT_TOOLS = 64
MAX_SESSION_TOOLS = 128  # OpenAI's limit on tools in one request
DEFAULT_TIMEOUT_MS = 5000
MAX_TIMEOUT_MS = 60000
DEFAULT_FILLER_MS = 1000
MAX_FILLER_MS = MAX_TIMEOUT_MS  # a filler later than any tool may take is never heard
MAX_FILLER_CHARS = 200
DEFAULT_MAX_ROUNDS = 3
MAX_ROUNDS = 10
# What a voice turn can use of one result; a longer one is cut (and says so).
MAX_RESULT_CHARS = 16000
MAX_REASON_CHARS = 300
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# MCP: listing at start (all servers at once) waits at most this long; an unreachable
# server is then retried in the background, from the first to the longest pause.
MCP_LIST_TIMEOUT_S = 10.0
MCP_RETRY_FIRST_S = 1.0
MCP_RETRY_MAX_S = 30.0
MCP_MAX_LIST_PAGES = 20
MCP_CLOSE_TIMEOUT_S = 5.0


class ToolFailed(Exception):
    """A tool call did not give a result. `reason` is for logs and the Error event."""

    def __init__(self, tool: str, reason: str, timed_out: bool = False):
        super().__init__(tool, reason)
        self.tool = tool
        self.reason = reason
        self.timed_out = timed_out

    def __str__(self) -> str:
        return f"{self.tool}: {self.reason}"


@dataclass
class ToolSpec:
    """One tool a session may call."""

    definition: tools_pb2.ToolDefinition
    kind: str  # "client", "http", "mcp" or "builtin"
    timeout_s: float
    # The compiled argument schema (arguments() uses it).
    _validator: Any = field(default=None, repr=False, compare=False)


# ---------------------------------------------------------------- schemas

# An empty registry: a $ref outside the schema fails instead of being fetched (jsonschema's
# default registry fetches it, deprecated but still so in 4.26).
_NO_REMOTE_REFS = referencing.Registry()


def _not_enforced(validator, value, instance, schema):
    return iter(())


def compile_schema(parameters_json: str, client: bool = False):
    """The validator for a tool's parameters (a JSON Schema object, "" = no arguments);
    ValueError says what is wrong with it."""
    if len(parameters_json) > MAX_SCHEMA_CHARS:
        raise ValueError(f"parameters_json is over {MAX_SCHEMA_CHARS} characters")
    if not parameters_json.strip():
        schema: Any = {"type": "object"}
    else:
        try:
            schema = json.loads(parameters_json)
        except json.JSONDecodeError as error:
            raise ValueError(f"parameters_json is not JSON: {error}") from None
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ValueError('parameters_json must be a JSON Schema with "type": "object" (the arguments object)')
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as error:
        raise ValueError(f"parameters_json is not a valid JSON Schema: {_short(error.message)}") from None
    for ref in _refs(schema):
        if not ref.startswith("#"):
            raise ValueError(f"parameters_json: $ref {ref!r} is not local; only references within the schema (#...) are allowed")
    if client:
        cls = jsonschema.validators.extend(cls, {"pattern": _not_enforced})
    return cls(schema, registry=_NO_REMOTE_REFS)


def _refs(node) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef", "$recursiveRef") and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _short(text: str, limit: int = MAX_REASON_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ---------------------------------------------------------------- the tools file


@dataclass
class HttpTool:
    spec: ToolSpec
    url: str  # with {placeholders} in its path and query
    method: str
    headers: dict[str, str] = field(repr=False)
    placeholders: tuple[str, ...]

    def request(self, arguments: dict) -> tuple[str, dict]:
        """The URL with its placeholders filled, and the arguments left for the query or body."""
        filled = {}
        for name in self.placeholders:
            if name not in arguments:
                raise ToolFailed(self.spec.definition.name, f"argument {name!r} is missing")
            value = arguments[name]
            text = json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)
            if text in (".", ".."):
                raise ToolFailed(self.spec.definition.name, f"argument {name!r} may not be {text!r}")
            filled[name] = quote(text, safe="")
        url = self.url.format_map(filled)
        if urlsplit(url).netloc != urlsplit(self.url).netloc:  # cannot happen (placeholders are encoded); kept as a guard
            raise ToolFailed(self.spec.definition.name, "arguments changed the request's host")
        return url, {k: v for k, v in arguments.items() if k not in filled}


@dataclass
class McpServerConfig:
    name: str
    url: str
    headers: dict[str, str] = field(repr=False)
    timeout_s: float
    prefix: str = ""
    only: tuple[str, ...] = ()  # the tools to offer; () = all


def _host_allowed(host: str, patterns: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern == "*" or pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


class _FileReader:
    """Checks the tools file, entry by entry; every error names the file, the entry and the fix."""

    def __init__(self, path: str, allowed_hosts: list[str], environ):
        self.path = path
        self.allowed_hosts = allowed_hosts
        self.environ = environ
        self.secrets: set[str] = set()

    def fail(self, where: str, message: str) -> NoReturn:
        raise SystemExit(f"tools file {self.path}: {where}: {message}")

    def read(self) -> tuple[list[HttpTool], list[McpServerConfig]]:
        try:
            data = yaml.safe_load(Path(self.path).read_text()) or {}
        except OSError as error:
            raise SystemExit(f"tools file {self.path}: cannot read it: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise SystemExit(f"tools file {self.path}: not valid YAML or JSON: {_short(error)}") from None
        if not isinstance(data, dict):
            raise SystemExit(f"tools file {self.path}: expected a mapping with http_tools and/or mcp_servers")
        unknown = set(data) - {"http_tools", "mcp_servers"}
        if unknown:
            raise SystemExit(f"tools file {self.path}: unknown keys {sorted(unknown)}; use http_tools and mcp_servers")
        http = [self.http_tool(i, entry) for i, entry in enumerate(self.entries(data, "http_tools"))]
        seen: set[str] = set()
        for tool in http:
            name = tool.spec.definition.name
            if name in seen:
                self.fail(f"http_tools ({name})", "two HTTP tools have this name")
            if name == END_CALL:
                self.fail(f"http_tools ({name})", f"{END_CALL} is the built-in tool's name; choose another")
            seen.add(name)
        servers = [self.mcp_server(i, entry) for i, entry in enumerate(self.entries(data, "mcp_servers"))]
        if len({s.name for s in servers}) != len(servers):
            raise SystemExit(f"tools file {self.path}: two mcp_servers have the same name")
        return http, servers

    def entries(self, data: dict, key: str) -> list[dict]:
        entries = data.get(key) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SystemExit(f"tools file {self.path}: {key} must be a list of mappings")
        return entries

    def check_keys(self, where: str, entry: dict, required: set[str], optional: set[str]) -> None:
        missing = required - set(entry)
        if missing:
            self.fail(where, f"missing {sorted(missing)}")
        unknown = set(entry) - required - optional
        if unknown:
            self.fail(where, f"unknown keys {sorted(unknown)}; allowed: {sorted(required | optional)}")

    def name(self, where: str, entry: dict) -> str:
        name = entry.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            self.fail(where, f"name {name!r} must be 1-64 letters, digits, _ or -")
        return name

    def timeout_s(self, where: str, entry: dict) -> float:
        timeout_ms = entry.get("timeout_ms", DEFAULT_TIMEOUT_MS)
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or not 0 < timeout_ms <= MAX_TIMEOUT_MS:
            self.fail(where, f"timeout_ms must be an integer from 1 to {MAX_TIMEOUT_MS}")
        return timeout_ms / 1000

    def url(self, where: str, url) -> str:
        if not isinstance(url, str):
            self.fail(where, "url must be a string")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(where, f"url must be http:// or https:// with a host, not {url!r}")
        if "{" in parts.netloc or "}" in parts.netloc:
            self.fail(where, "placeholders may fill the url's path and query, never its host or port")
        if not _host_allowed(parts.hostname, self.allowed_hosts):
            self.fail(where, f"host {parts.hostname!r} is not allowed; add it to tools_allowed_hosts "
                             f"(VOICESTACK_TOOLS_ALLOWED_HOSTS) if this tool may reach it")
        return url

    def headers(self, where: str, headers) -> dict[str, str]:
        if headers is None:
            return {}
        if not isinstance(headers, dict):
            self.fail(where, "headers must be a mapping of name: value")
        resolved = {}
        for key, value in headers.items():
            if not isinstance(value, str):
                self.fail(where, f"header {key!r} must be a string (\"env:NAME\" takes it from the environment)")
            if value.startswith("env:"):
                variable = value[4:]
                if not self.environ.get(variable):
                    self.fail(where, f"header {key!r} names environment variable {variable!r}, which is not set "
                                     f"(put it in the Secret the edge takes its environment from)")
                value = self.environ[variable]
                self.secrets.add(value)
            if any(c in value for c in "\r\n\0"):  # the HTTP client's error would quote the value
                self.fail(where, f"header {key!r} has a line break or NUL in its value")
            resolved[str(key)] = value
        return resolved

    def http_tool(self, index: int, entry: dict) -> HttpTool:
        where = f"http_tools[{index}]"
        self.check_keys(where, entry, {"name", "url"}, {"description", "parameters", "method", "headers", "timeout_ms"})
        name = self.name(where, entry)
        where = f"http_tools[{index}] ({name})"
        description = entry.get("description", "")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            self.fail(where, f"description must be text of at most {MAX_DESCRIPTION_CHARS} characters")
        parameters = entry.get("parameters", {"type": "object", "properties": {}})
        try:
            validator = compile_schema(json.dumps(parameters))
        except ValueError as error:
            self.fail(where, str(error).replace("parameters_json", "parameters"))
        method = str(entry.get("method", "GET")).upper()
        if method not in HTTP_METHODS:
            self.fail(where, f"method must be one of {', '.join(HTTP_METHODS)}")
        url = self.url(where, entry["url"])
        try:
            placeholders = tuple(dict.fromkeys(self.placeholders(url)))
        except ValueError as error:
            self.fail(where, f"url: {error}")
        required = set(parameters.get("required", []))
        for placeholder in placeholders:
            if placeholder not in parameters.get("properties", {}) or placeholder not in required:
                self.fail(where, f"url placeholder {{{placeholder}}} must be a required property of parameters")
        definition = tools_pb2.ToolDefinition(name=name, description=description, parameters_json=json.dumps(parameters))
        return HttpTool(spec=ToolSpec(definition, "http", self.timeout_s(where, entry), validator), url=url,
                        method=method, headers=self.headers(where, entry.get("headers")), placeholders=placeholders)

    @staticmethod
    def placeholders(url: str) -> Iterable[str]:
        for _, name, spec, conversion in string.Formatter().parse(url):
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise ValueError(f"placeholder {{{name}}} must be a plain argument name like {{city}}")
            yield name

    def mcp_server(self, index: int, entry: dict) -> McpServerConfig:
        where = f"mcp_servers[{index}]"
        self.check_keys(where, entry, {"name", "url"}, {"headers", "timeout_ms", "prefix", "tools"})
        name = self.name(where, entry)
        where = f"mcp_servers[{index}] ({name})"
        prefix = entry.get("prefix", "")
        if not isinstance(prefix, str) or (prefix and not NAME.match(prefix)):
            self.fail(where, "prefix must be letters, digits, _ or -")
        only = entry.get("tools", [])
        if not isinstance(only, list) or not all(isinstance(t, str) for t in only):
            self.fail(where, "tools must be a list of the server's tool names to offer")
        return McpServerConfig(name=name, url=self.url(where, entry["url"]), headers=self.headers(where, entry.get("headers")),
                               timeout_s=self.timeout_s(where, entry), prefix=prefix, only=tuple(only))


# ---------------------------------------------------------------- MCP


def _leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


class McpConnection:
    """One MCP server's session. Its own task enters and leaves the SDK's context (anyio
    requires one task to do both, and a failing transport cancels that task, not a caller)."""

    def __init__(self, server: McpServerConfig):
        self.server = server
        self._lock = asyncio.Lock()
        self._client = None
        self._closing: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._ending: set[asyncio.Task] = set()  # closing connections, kept referenced until done

    async def client(self):
        """The live session, opened (once, whoever asks first) if there is none."""
        async with self._lock:
            if self._task is None or self._task.done():
                ready = asyncio.get_running_loop().create_future()
                self._closing = asyncio.Event()
                self._task = asyncio.create_task(self._hold(ready, self._closing), name=f"mcp {self.server.name}")
                try:
                    self._client = await ready
                except BaseException:
                    self._task.cancel()
                    raise
            return self._client

    async def _hold(self, ready: asyncio.Future, closing: asyncio.Event) -> None:
        import httpx2
        from mcp.client import Client
        from mcp.client.streamable_http import streamable_http_client

        try:
            # The SDK holds a server-sent-event stream open, hence the long read timeout;
            # each call is bounded by its tool's timeout instead.
            async with httpx2.AsyncClient(headers=self.server.headers, follow_redirects=False,
                                          timeout=httpx2.Timeout(self.server.timeout_s, read=300.0)) as http, \
                    Client(streamable_http_client(self.server.url, http_client=http), cache=None) as client:
                if ready.done():  # the caller gave up while it connected
                    return
                ready.set_result(client)
                await closing.wait()
        except BaseException as error:
            if asyncio.current_task().cancelling():
                raise
            if not ready.done():
                ready.set_exception(error)
            else:
                log.warning("MCP server %s: the connection ended (%s); the next call reconnects",
                            self.server.name, type(_leaf(error)).__name__)

    def drop(self, client=None) -> None:
        """Close the session (`client` failed: unless another call reopened it since); the
        next client() opens a new one."""
        if client is not None and client is not self._client:
            return
        if self._task is not None and not self._task.done():
            self._ending.add(self._task)
            self._task.add_done_callback(self._ending.discard)
            self._closing.set()
        self._task = None

    async def list_tools(self) -> list:
        client = await self.client()
        tools, cursor = [], None
        for _ in range(MCP_MAX_LIST_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools += page.tools
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    async def aclose(self) -> None:
        task = self._task
        self.drop()
        ending = {t for t in (task, *self._ending) if t is not None}
        if ending:
            _, slow = await asyncio.wait(ending, timeout=MCP_CLOSE_TIMEOUT_S)
            for stuck in slow:
                stuck.cancel()


def _result_text(result) -> str:
    parts = []
    for item in result.content or []:
        if getattr(item, "type", "") == "text":
            parts.append(item.text)
        else:
            parts.append(f"[{getattr(item, 'type', 'non-text')} content omitted]")
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


# ---------------------------------------------------------------- the process-wide catalog


class ServerTools:
    """The operator's HTTP tools and MCP servers' tools: built once at edge start."""

    def __init__(self, filler: str = Settings.tool_filler):
        self.filler = filler  # the sessions' default filler (settings.tool_filler)
        self._specs: dict[str, ToolSpec] = {}
        self._http: dict[str, HttpTool] = {}
        self._mcp: dict[str, tuple[McpConnection, str]] = {}  # offered name -> (server, the server's name for it)
        self._servers: list[McpConnection] = []
        self._unlisted: set[str] = set()  # MCP servers whose tools are not known yet
        self._secrets: set[str] = set()
        self._client: httpx.AsyncClient | None = None
        self._retries: set[asyncio.Task] = set()

    @classmethod
    async def start(cls, settings, environ=os.environ) -> ServerTools:
        tools = cls(settings.tool_filler)
        if not settings.tools_file:
            return tools
        allowed = [h.strip().lower() for h in settings.tools_allowed_hosts.split(",") if h.strip()]
        reader = _FileReader(settings.tools_file, allowed, environ)
        http, servers = reader.read()
        tools._secrets = {s for s in reader.secrets if len(s) >= 4}
        for tool in http:
            tools._add(tool.spec, source="the tools file")
            tools._http[tool.spec.definition.name] = tool
        if http:
            # No redirects: a redirect could carry a tool's headers to another host.
            tools._client = httpx.AsyncClient(follow_redirects=False)
            log.info("tools: HTTP %s", ", ".join(f"{t.spec.definition.name} ({t.method} {urlsplit(t.url).hostname})"
                                                 for t in http))
        tools._servers = [McpConnection(s) for s in servers]
        listings = await asyncio.gather(*(tools._list(s) for s in tools._servers))
        for server, listing in zip(tools._servers, listings):
            if listing is None:
                tools._unlisted.add(server.server.name)
                task = asyncio.create_task(tools._keep_listing(server), name=f"mcp list {server.server.name}")
                tools._retries.add(task)
                task.add_done_callback(tools._retries.discard)
            else:
                tools._register(server, listing)
        return tools

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> ToolSpec | None:
        return self._specs.get(name)

    def missing_servers(self) -> list[str]:
        """MCP servers configured but not listed yet (unreachable so far)."""
        return sorted(self._unlisted)

    async def call(self, name: str, arguments: dict) -> str:
        """Run an HTTP or MCP tool with arguments already checked (SessionTools.arguments)."""
        spec = self._specs.get(name)
        if spec is None:
            raise ToolFailed(name, "not a server tool")
        try:
            async with asyncio.timeout(spec.timeout_s):
                if name in self._http:
                    text = await self._call_http(self._http[name], arguments)
                else:
                    text = await self._call_mcp(name, arguments)
        except TimeoutError:
            failed = ToolFailed(name, f"timed out after {spec.timeout_s * 1000:.0f} ms", timed_out=True)
            log.warning("tool %s", failed)
            raise failed from None
        except ToolFailed as failed:
            failed.reason = self._scrub(failed.reason)  # the one place a reason leaves: no secret in it
            log.warning("tool %s", failed)
            raise
        if len(text) > MAX_RESULT_CHARS:
            text = text[:MAX_RESULT_CHARS] + " … (cut: the result was longer)"
        return text

    async def aclose(self) -> None:
        for task in list(self._retries):
            task.cancel()
        await asyncio.gather(*self._retries, *(s.aclose() for s in self._servers), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # -- internals

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _short(text)

    def _add(self, spec: ToolSpec, source: str) -> bool:
        name = spec.definition.name
        if name == END_CALL or name in self._specs:
            why = "the built-in tool has this name" if name == END_CALL else "an earlier tool has this name"
            log.error("tools: %s from %s is skipped: %s (set the MCP server's prefix)", name, source, why)
            return False
        self._specs[name] = spec
        return True

    async def _call_http(self, tool: HttpTool, arguments: dict) -> str:
        name = tool.spec.definition.name
        url, rest = tool.request(arguments)
        if tool.method in ("GET", "DELETE"):
            request = {"params": {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in rest.items()}}
        else:
            request = {"json": rest}
        try:
            async with self._client.stream(tool.method, url, headers=tool.headers, timeout=tool.spec.timeout_s,
                                           **request) as response:
                if response.is_redirect:
                    raise ToolFailed(name, f"HTTP {response.status_code}: redirects are not followed; use the final URL")
                if not response.is_success:
                    raise ToolFailed(name, f"HTTP {response.status_code} {response.reason_phrase}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_RESULT_CHARS * 4:
                        break
                return bytes(body).decode(response.encoding or "utf-8", errors="replace")
        except httpx.TimeoutException:
            raise TimeoutError from None
        except httpx.HTTPError as error:
            raise ToolFailed(name, f"request failed: {type(error).__name__}: {error}") from None

    async def _call_mcp(self, name: str, arguments: dict) -> str:
        from mcp.shared.exceptions import MCPError

        server, remote = self._mcp[name]
        client = None
        try:
            client = await server.client()
            result = await client.call_tool(remote, arguments)
        except Exception as error:  # noqa: BLE001 - any failure but the tool's own (is_error, below)
            # Most are a broken session (the server restarted: MCPError "Connection closed"; the
            # network); reopening costs one round trip, so the next call always starts afresh.
            server.drop(client)
            leaf = _leaf(error)
            what = str(leaf) if isinstance(leaf, MCPError) else f"{type(leaf).__name__}: {leaf}"
            raise ToolFailed(name, f"MCP server {server.server.name} failed: {what}") from None
        if result.is_error:
            raise ToolFailed(name, f"the tool reported an error: {_result_text(result)}")
        return _result_text(result)

    async def _list(self, server: McpConnection, retry: bool = False) -> list | None:
        try:
            async with asyncio.timeout(MCP_LIST_TIMEOUT_S):
                return await server.list_tools()
        except Exception as error:  # noqa: BLE001 - unreachable now; retried in the background
            server.drop()
            leaf = _leaf(error)
            # Said once; the retries (every MCP_RETRY_MAX_S at most) only at debug level.
            log.log(logging.DEBUG if retry else logging.WARNING,
                    "tools: MCP server %s (%s) could not be listed (%s); its tools are left out until it answers",
                    server.server.name, urlsplit(server.server.url).hostname,
                    self._scrub(f"{type(leaf).__name__}: {leaf}") if str(leaf) else type(leaf).__name__)
            return None

    async def _keep_listing(self, server: McpConnection) -> None:
        pause = MCP_RETRY_FIRST_S
        while True:
            await asyncio.sleep(pause)
            listing = await self._list(server, retry=True)
            if listing is not None:
                self._unlisted.discard(server.server.name)
                self._register(server, listing)
                return
            pause = min(pause * 2, MCP_RETRY_MAX_S)

    def _register(self, server: McpConnection, listing: list) -> None:
        config = server.server
        offered = []
        for tool in listing:
            if config.only and tool.name not in config.only:
                continue
            name = config.prefix + tool.name
            where = f"MCP server {config.name}"
            if not NAME.match(name):
                log.warning("tools: %s's tool %r is skipped: a name must be 1-64 letters, digits, _ or -", config.name, name)
                continue
            schema = json.dumps(tool.input_schema or {"type": "object"})
            try:
                validator = compile_schema(schema)
            except ValueError as error:
                log.warning("tools: %s's tool %s is skipped: %s", config.name, name, error)
                continue
            definition = tools_pb2.ToolDefinition(
                name=name, description=(tool.description or tool.title or "")[:MAX_DESCRIPTION_CHARS], parameters_json=schema)
            if self._add(ToolSpec(definition, "mcp", config.timeout_s, validator), source=where):
                self._mcp[name] = (server, tool.name)
                offered.append(name)
        missing = set(config.only) - {t.name for t in listing}
        if missing:
            log.warning("tools: MCP server %s has no tools named %s", config.name, sorted(missing))
        log.info("tools: MCP server %s offers %s", config.name, ", ".join(offered) or "nothing")


# ---------------------------------------------------------------- one session's tools


class SessionTools:
    """The tools one session may call, from its ToolsConfig."""

    def __init__(self, specs: dict[str, ToolSpec], server: ServerTools, filler: str, filler_ms: int, max_rounds: int):
        self._specs = specs
        self.server = server
        self.filler = filler
        self.filler_ms = filler_ms
        self.max_rounds = max_rounds

    @classmethod
    def from_config(cls, config: edge_pb2.ToolsConfig, server: ServerTools) -> SessionTools:
        specs: dict[str, ToolSpec] = {}
        if len(config.client_tools) > MAX_CLIENT_TOOLS:
            raise invalid(f"tools.client_tools has {len(config.client_tools)} tools; at most {MAX_CLIENT_TOOLS}")
        server_names = set(server.names())
        for index, tool in enumerate(config.client_tools):
            definition = tool.definition
            name = definition.name
            where = f"tools.client_tools[{index}] ({name!r})"
            if not NAME.match(name):
                raise invalid(f"{where}: a tool name must be 1-64 letters, digits, _ or -")
            if name in specs:
                raise invalid(f"{where}: two client tools are named {name}")
            if name in server_names:
                raise invalid(f"{where}: {name} is a server tool's name; rename the client tool")
            if name == END_CALL and config.end_call:
                raise invalid(f"{where}: {END_CALL} is the built-in tool's name (tools.end_call); rename the client tool")
            if len(definition.description) > MAX_DESCRIPTION_CHARS:
                raise invalid(f"{where}: description is over {MAX_DESCRIPTION_CHARS} characters")
            if not 0 <= tool.timeout_ms <= MAX_TIMEOUT_MS:
                raise invalid(f"{where}: timeout_ms {tool.timeout_ms} is out of range; 0 (= {DEFAULT_TIMEOUT_MS}) "
                              f"to {MAX_TIMEOUT_MS}")
            try:
                validator = compile_schema(definition.parameters_json, client=True)
            except ValueError as error:
                raise invalid(f"{where}: {error}") from None
            specs[name] = ToolSpec(definition, "client", (tool.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000, validator)
        named = [name for name in dict.fromkeys(config.server_tools) if name != "*"]
        for name in named:
            if server.spec(name) is None:
                missing = server.missing_servers()
                hint = f" (MCP servers not reachable yet: {', '.join(missing)})" if missing else ""
                raise invalid(f"tools.server_tools: unknown server tool {name!r}; this edge offers "
                              f"{', '.join(server.names()) or 'none'}{hint}")
        for name in server.names() if "*" in config.server_tools else named:
            specs[name] = server.spec(name)
        if config.end_call:
            specs[END_CALL] = ToolSpec(END_CALL_DEFINITION, "builtin", 0.0, compile_schema(END_CALL_DEFINITION.parameters_json))
        if len(specs) > MAX_SESSION_TOOLS:
            raise invalid(f"tools: {len(specs)} tools in all; at most {MAX_SESSION_TOOLS} (name fewer server_tools than \"*\")")
        if len(config.filler) > MAX_FILLER_CHARS:
            raise invalid(f"tools.filler is over {MAX_FILLER_CHARS} characters")
        if not 0 <= config.filler_ms <= MAX_FILLER_MS:
            raise invalid(f"tools.filler_ms {config.filler_ms} is out of range; 0 (= {DEFAULT_FILLER_MS}) to {MAX_FILLER_MS}")
        if not 0 <= config.max_rounds <= MAX_ROUNDS:
            raise invalid(f"tools.max_rounds {config.max_rounds} is out of range; 0 (= {DEFAULT_MAX_ROUNDS}) to {MAX_ROUNDS}")
        return cls(specs, server, filler=config.filler or server.filler,
                   filler_ms=config.filler_ms or DEFAULT_FILLER_MS, max_rounds=config.max_rounds or DEFAULT_MAX_ROUNDS)

    def definitions(self) -> list[tools_pb2.ToolDefinition]:
        """What the LLM is offered: client tools, server tools, then end_call."""
        return [spec.definition for spec in self._specs.values()]

    def spec(self, name: str) -> ToolSpec | None:
        return self._specs.get(name)

    def arguments(self, call: tools_pb2.ToolCall) -> dict:
        """The call's arguments, parsed and checked against its tool's schema."""
        spec = self._specs.get(call.name)
        if spec is None:
            raise ToolFailed(call.name, f"unknown tool {call.name!r}; this session offers {', '.join(self._specs) or 'none'}")
        try:
            arguments = json.loads(call.arguments_json) if call.arguments_json.strip() else {}
        except json.JSONDecodeError as error:
            raise ToolFailed(call.name, f"arguments are not JSON: {error}") from None
        if not isinstance(arguments, dict):
            raise ToolFailed(call.name, "arguments are not a JSON object")
        try:
            error = jsonschema.exceptions.best_match(spec._validator.iter_errors(arguments))
        except Exception as failure:  # noqa: BLE001 - e.g. a $ref the schema cannot resolve
            raise ToolFailed(call.name, f"arguments could not be checked: {_short(failure)}") from None
        if error is not None:
            at = "/".join(str(p) for p in error.absolute_path)
            raise ToolFailed(call.name, f"arguments do not fit: {_short(error.message)}" + (f" (at {at})" if at else ""))
        return arguments
