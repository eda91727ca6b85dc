"""The tool registry: every tool a conversation may enable, described once (``Tool``: name, JSON
schema, a Python callable, limits), and the one way a tool is run (``ToolRegistry.call``).

A call never raises: bad arguments, a tool's own error, a time-out or an oversize result
all become the result text the model reads next (``ToolResult.error`` says which), since a
model can recover from "division by zero" but a chat cannot recover from a crash. Adding a
built-in is one ``Tool(...)`` entry in builtins.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engines.structured import SchemaError, check_tools

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # seconds a tool may run
DEFAULT_RESULT_CHARS = 8_000  # characters of a result the model gets (and the tree keeps)
MAX_ARGUMENT_CHARS = 16_000  # a call's arguments as JSON
MAX_CALLS_PER_STEP = 8  # tool calls of one reply that are run (a grammar-held model makes one)


class ToolError(Exception):
    """A tool's refusal of its arguments, or its failure, as the model should read it."""


@dataclass(frozen=True)
class ToolContext:
    """Who a tool runs for: built-ins that read the visitor's data read only theirs."""

    owner: str
    conversation_id: str | None = None
    db: Any = None  # the app's Database (search_my_conversations reads it)


@dataclass(frozen=True)
class Tool:
    name: str  # as the model calls it: 1-64 of [A-Za-z0-9_-]
    description: str
    parameters: dict[str, Any]  # a JSON schema of the arguments object
    run: Callable[[dict[str, Any], ToolContext], str]
    timeout: float = DEFAULT_TIMEOUT
    max_result_chars: int = DEFAULT_RESULT_CHARS
    source: str = "builtin"  # "builtin", or the MCP server it comes from ("mcp:<name>")
    title: str = ""  # what the settings sheet calls it

    def spec(self) -> dict[str, Any]:
        """The tool as OpenAI's ``tools`` list has it (what a model is shown)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def listing(self) -> dict[str, Any]:
        """The tool as ``GET /api/tools`` lists it."""
        return {"name": self.name, "title": self.title or self.name, "description": self.description,
                "source": self.source, "parameters": self.parameters,
                "timeout_seconds": self.timeout, "max_result_chars": self.max_result_chars}


@dataclass(frozen=True)
class ToolResult:
    text: str
    ms: float
    error: str | None = None  # "bad_arguments", "failed", "timeout", "unknown_tool"; None: ran
    truncated: bool = False

    def meta(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ms": self.ms}
        if self.error:
            data["error"] = self.error
        if self.truncated:
            data["truncated"] = True
        return data


@dataclass
class ToolRegistry:
    """The built-ins and whatever the MCP servers (mcp.py) offer now."""

    builtins: list[Tool]
    mcp: Any = None  # an McpHub, or None without BCHAT_MCP_FILE

    def available(self) -> list[Tool]:
        tools = list(self.builtins)
        if self.mcp is not None:
            tools += self.mcp.tools()
        return tools

    def get(self, name: str) -> Tool | None:
        return next((t for t in self.available() if t.name == name), None)

    def enabled(self, names: Any) -> list[Tool]:
        """The tools of a conversation's ``tools`` setting that exist now (a server gone from
        the MCP file is skipped, not an error: the conversation goes on without it)."""
        if not isinstance(names, list):
            return []
        wanted = [n for n in names if isinstance(n, str)]
        return [t for t in self.available() if t.name in wanted]

    @staticmethod
    def specs(tools: list[Tool]) -> list[dict[str, Any]]:
        specs = [t.spec() for t in tools]
        try:
            check_tools(specs, "auto")  # an MCP server's odd schema is left out, not sent
        except SchemaError:
            specs = [s for s in specs if _fine(s)]
        return specs

    def call(self, name: str, arguments: Any, context: ToolContext,
             cancel: threading.Event | None = None) -> ToolResult:
        """Run one call: arguments as the model wrote them (a JSON string or an object).
        ``cancel`` (a stop) gives the call up at once."""
        started = time.perf_counter()

        def elapsed() -> float:
            return round((time.perf_counter() - started) * 1000, 1)

        tool = self.get(name)
        if tool is None:
            return ToolResult(f"Error: there is no tool named {str(name)[:64]!r}.", elapsed(),
                              "unknown_tool")
        if isinstance(arguments, str):
            if len(arguments) > MAX_ARGUMENT_CHARS:
                return ToolResult("Error: the arguments are too long.", elapsed(), "bad_arguments")
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                return ToolResult("Error: the arguments are not valid JSON.", elapsed(),
                                  "bad_arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return ToolResult("Error: the arguments must be a JSON object.", elapsed(),
                              "bad_arguments")
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["text"] = tool.run(arguments, context)
            except ToolError as exc:
                box["error"] = ("failed", f"Error: {exc}")
            except Exception as exc:  # a tool's bug is its result, never the chat's crash
                log.warning("tool %s failed: %s: %s", name, type(exc).__name__, exc)
                box["error"] = ("failed", f"Error: the tool failed ({type(exc).__name__}: "
                                          f"{str(exc)[:300]})")

        # A thread per call, so a tool that hangs costs its time limit, not the run: the
        # thread is left to finish alone (built-ins are bounded; an MCP call has its own
        # time-out in the SDK too).
        worker = threading.Thread(target=work, name=f"bchat-tool-{name}", daemon=True)
        worker.start()
        deadline = time.monotonic() + tool.timeout
        while worker.is_alive() and time.monotonic() < deadline:
            if cancel is not None and cancel.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                return ToolResult("Error: stopped before the tool answered.", elapsed(), "stopped")
            worker.join(0 if cancel is not None else max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            return ToolResult(f"Error: the tool {name} took longer than {tool.timeout:g} s and "
                              "was given up.", elapsed(), "timeout")
        if "error" in box:
            code, text = box["error"]
            return ToolResult(clip(text, tool.max_result_chars)[0], elapsed(), code)
        text = box.get("text")
        if not isinstance(text, str):
            text = json.dumps(text, ensure_ascii=False, default=str)
        text, cut = clip(text, tool.max_result_chars)
        return ToolResult(text, elapsed(), None, cut)

    def close(self) -> None:
        if self.mcp is not None:
            self.mcp.close()


def result_message(call: dict[str, Any], index: int, name: Any, text: str,
                   meta: dict[str, Any]) -> dict[str, Any]:
    """The result of a reply's call number ``index`` as the tree keeps it: a ``tool``
    message's content, and its meta (which call it answers, the tool, time, error)."""
    return {"content": text, "meta": {"tool_call_id": call.get("id") or f"call_{index}",
                                      "name": str(name)[:64], **meta}}


def clip(text: str, limit: int) -> tuple[str, bool]:
    """``text`` within ``limit`` characters, saying how much was cut (a model told nothing
    would take a half result for the whole)."""
    if len(text) <= limit:
        return text, False
    note = f"\n[… cut: {len(text) - limit} more characters]"
    return text[:max(0, limit - len(note))] + note, True


def _fine(spec: dict[str, Any]) -> bool:
    try:
        check_tools([spec], "auto")
        return True
    except SchemaError:
        return False
