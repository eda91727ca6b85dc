"""MCP servers as tools: the admin's list (BCHAT_MCP_FILE), reached through the official ``mcp``
Python SDK over stdio (a command bchat starts) or Streamable HTTP (a URL).

Only the admin names servers: a visitor enables their tools per conversation and can never add
one, so a visitor cannot make the server fetch an address of their choosing. Each call opens
its own connection (a stdio server is started for it and ended after): slower than a kept
session, but nothing is left half-open when a call times out, and a server that crashed is
simply started again next time. Tool listings are kept for LIST_TTL seconds.

The file (TOML; or JSON with the same shape)::

    [[server]]
    name = "notes"                 # tools are offered as notes__<tool>
    command = "python"             # stdio: a command and its arguments
    args = ["/srv/mcp/notes.py"]
    env = { NOTES_DIR = "/srv/notes" }

    [[server]]
    name = "search"
    url = "http://127.0.0.1:9000/mcp"   # Streamable HTTP
    headers = { Authorization = "Bearer …" }  # or headers_env = { Authorization = "VAR" }
    timeout = 20                   # seconds a call may take (default 15)
    max_result_chars = 8000
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import DEFAULT_RESULT_CHARS, Tool, ToolContext, ToolError

log = logging.getLogger(__name__)

LIST_TTL = 300.0  # seconds a server's tool listing is kept
LIST_TIMEOUT = 15.0  # seconds a listing may take
DEFAULT_CALL_TIMEOUT = 15.0
START_GRACE = 10.0  # seconds a stdio server may take to start and stop around a call
_SERVER_NAME = re.compile(r"[A-Za-z0-9_-]{1,24}")
SEPARATOR = "__"


@dataclass(frozen=True)
class McpServer:
    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    timeout: float = DEFAULT_CALL_TIMEOUT
    max_result_chars: int = DEFAULT_RESULT_CHARS

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"

    def target(self) -> Any:
        """What mcp.Client connects to: a URL, or the parameters of a command to start."""
        if self.url:
            return self.url
        from mcp.client.stdio import StdioServerParameters

        return StdioServerParameters(command=self.command, args=list(self.args),
                                     env=self.env or None, cwd=self.cwd)

    def client(self, timeout: float):
        from mcp import Client

        target = self.target()
        if self.headers and self.url:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            # The admin's headers (a token for the server) on the SDK's own transport.
            http = httpx2.AsyncClient(headers=self.headers, timeout=timeout)
            target = streamable_http_client(self.url, http_client=http)
        return Client(target, read_timeout_seconds=timeout)


def load_servers(path: str | Path) -> list[McpServer]:
    """The servers of BCHAT_MCP_FILE; ValueError says what is wrong with it."""
    import tomllib

    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
    entries = data.get("server", data.get("servers", []))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of [[server]] tables")
    servers, names = [], set()
    for i, entry in enumerate(entries):
        where = f"{path}: server #{i + 1}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a table")
        name = entry.get("name")
        if not isinstance(name, str) or not _SERVER_NAME.fullmatch(name) or SEPARATOR in name:
            raise ValueError(f"{where}: name must be 1-24 letters, digits, - or a single _")
        if name in names:
            raise ValueError(f"{where}: two servers are named {name!r}")
        names.add(name)
        if bool(entry.get("command")) == bool(entry.get("url")):
            raise ValueError(f"{where} ({name}) needs a command (stdio) or a url (Streamable HTTP)")
        headers = {str(k): str(v) for k, v in (entry.get("headers") or {}).items()}
        for header, variable in (entry.get("headers_env") or {}).items():
            if not os.environ.get(variable):
                raise ValueError(f"{where} ({name}): ${variable} is not set")
            headers[str(header)] = os.environ[variable]
        servers.append(McpServer(
            name=name, command=entry.get("command"), args=tuple(map(str, entry.get("args") or ())),
            env={str(k): str(v) for k, v in (entry.get("env") or {}).items()},
            cwd=entry.get("cwd"), url=entry.get("url"), headers=headers,
            timeout=float(entry.get("timeout", DEFAULT_CALL_TIMEOUT)),
            max_result_chars=int(entry.get("max_result_chars", DEFAULT_RESULT_CHARS))))
    return servers


def result_text(result: Any) -> str:
    """An MCP tool result as the text a model reads: its text parts; other parts named; the
    structured content as JSON when there is no text."""
    parts = []
    for block in result.content or ():
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        else:
            parts.append(f"[{kind or 'unknown'} content left out]")
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, default=str))
    text = "\n".join(parts)
    if getattr(result, "is_error", False):
        raise ToolError(text or "the MCP tool reported an error")
    return text


@dataclass
class _Listing:
    tools: list[Tool] = field(default_factory=list)
    error: str | None = None
    fetched_at: float = float("-inf")


class McpHub:
    """The admin's MCP servers and the tools they offer."""

    def __init__(self, servers: list[McpServer]) -> None:
        self.servers = servers
        self._listings: dict[str, _Listing] = {s.name: _Listing() for s in servers}
        self._locks = {s.name: threading.Lock() for s in servers}
        # Listed once in the background at start, so the first settings sheet need not wait
        # for every server to start.
        if servers:
            threading.Thread(target=self.tools, name="bchat-mcp-list", daemon=True).start()

    def tools(self) -> list[Tool]:
        found: list[Tool] = []
        for server in self.servers:
            found += self._listing(server).tools
        return found

    def status(self) -> list[dict[str, Any]]:
        out = []
        for server in self.servers:
            listing = self._listing(server)
            out.append({"name": server.name, "transport": server.transport,
                        "tools": [t.name for t in listing.tools], "error": listing.error})
        return out

    def _listing(self, server: McpServer) -> _Listing:
        listing = self._listings[server.name]
        if time.monotonic() - listing.fetched_at < LIST_TTL:
            return listing
        with self._locks[server.name]:  # one listing at a time per server
            listing = self._listings[server.name]
            if time.monotonic() - listing.fetched_at < LIST_TTL:
                return listing
            try:
                listing = _Listing(self._fetch_tools(server), None, time.monotonic())
            except Exception as exc:
                log.warning("MCP server %s: cannot list its tools: %s: %s", server.name,
                            type(exc).__name__, exc)
                # Tried again after a shorter wait: a server starting up is soon there.
                listing = _Listing([], f"cannot list its tools ({type(exc).__name__})",
                                   time.monotonic() - LIST_TTL + 10)
            self._listings[server.name] = listing
            return listing

    def _fetch_tools(self, server: McpServer) -> list[Tool]:
        async def fetch() -> list[Any]:
            async with asyncio.timeout(LIST_TIMEOUT):
                async with server.client(LIST_TIMEOUT) as client:
                    return list((await client.list_tools()).tools)

        tools = []
        for remote in _run(fetch()):
            name = f"{server.name}{SEPARATOR}{re.sub(r'[^A-Za-z0-9_-]', '_', remote.name)}"[:64]
            schema = remote.input_schema if isinstance(remote.input_schema, dict) else {}
            tools.append(Tool(
                name=name, description=(remote.description or "")[:1000],
                parameters=schema or {"type": "object", "properties": {}},
                run=self._caller(server, remote.name),
                # The SDK's time-out is the call's; this one adds the server's start and end.
                timeout=server.timeout + 2 * START_GRACE,
                max_result_chars=server.max_result_chars, source=f"mcp:{server.name}",
                title=getattr(remote, "title", None) or remote.name))
        return tools

    @staticmethod
    def _caller(server: McpServer, remote_name: str):
        def call(arguments: dict[str, Any], context: ToolContext) -> str:
            async def go() -> str:
                # The call has server.timeout; starting (and ending) the server a grace more.
                async with asyncio.timeout(server.timeout + START_GRACE):
                    async with server.client(server.timeout + START_GRACE) as client:
                        return result_text(await client.call_tool(
                            remote_name, arguments, read_timeout_seconds=server.timeout))

            try:
                return _run(go())
            except BaseExceptionGroup as group:  # anyio's task groups wrap the real error
                leaf = _first_leaf(group)
                if isinstance(leaf, ToolError):
                    raise leaf from None
                raise ToolError(f"the MCP server {server.name} failed: {type(leaf).__name__}: "
                                f"{str(leaf)[:300]}") from None
            except TimeoutError:
                raise ToolError(f"the MCP server {server.name} did not answer within "
                                f"{server.timeout:g} s") from None

        return call

    def close(self) -> None:
        pass  # no connection outlives its call


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
        leaf = leaf.exceptions[0]
    return leaf


def _run(coroutine: Any) -> Any:
    """A coroutine run to its end on a loop of its own (the caller is a plain thread)."""
    return asyncio.run(coroutine)
