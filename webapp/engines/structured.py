"""Structured replies on the embedded engines: JSON schemas, tool calls, stop strings, thinking.

llama.cpp can only be *made* to follow a format by grammar-constrained sampling: a GBNF grammar
(from llama.cpp's JSON-schema-to-grammar converter, as vendored in llama-cpp-python) sits at
the head of a request's sampler chain and masks every token that would break it. This module
builds those grammars from OpenAI's ``response_format`` and ``tools``/``tool_choice``, writes
the tool instructions and tool turns into messages a plain chat template accepts, and reads a
finished (or streaming) reply back into content, reasoning and tool calls. It knows nothing of
HTTP; upstream engines never use it (they get ``response_format`` and ``tools`` as given).

Tool calls use the Hermes/Qwen convention many small models were trained on::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

With ``tool_choice`` "required" or a named function the grammar allows only that; with
"auto" it allows either that or free text that does not start with ``<``.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 200
MAX_TOOLS = 64
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The vendored Python converter lets raw control characters (a newline…) into JSON strings,
# which strict JSON parsers refuse; llama.cpp's C++ converter excludes them. Same here.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


class SchemaError(ValueError):
    """A response_format or tools value that cannot become a grammar; the text says why."""


# -- validation of the OpenAI values ----------------------------------------------------------


def check_response_format(value: Any) -> dict[str, Any] | None:
    """OpenAI's ``response_format``: None for plain text, else the value as given."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise SchemaError("response_format must be an object with a type")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")  # llama-cpp-python's extension; OpenAI has none
        if schema is not None and not isinstance(schema, dict):
            raise SchemaError("response_format.schema must be an object")
        return value
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise SchemaError('response_format json_schema needs {"json_schema": {"name": …, '
                              '"schema": {…}}}')
        return value
    raise SchemaError(f"response_format type must be text, json_object or json_schema, not {kind!r}")


def check_tools(tools: Any, tool_choice: Any) -> tuple[list[dict[str, Any]] | None, Any]:
    """OpenAI's ``tools`` and ``tool_choice``, checked; (None, None) when there are none."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise SchemaError("tool_choice needs tools")
        return None, None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise SchemaError(f"tools must be a list of at most {MAX_TOOLS} functions")
    names = set()
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise SchemaError('each tool must be {"type": "function", "function": {"name": …}}')
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SchemaError("a function name must be 1-64 letters, digits, _ or -")
        if name in names:
            raise SchemaError(f"two tools are named {name!r}")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise SchemaError(f"the parameters of {name!r} must be a JSON schema object")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise SchemaError(f"the description of {name!r} must be a string")
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        chosen = function.get("name") if isinstance(function, dict) and tool_choice.get(
            "type") == "function" else None
        if not isinstance(chosen, str) or chosen not in names:
            raise SchemaError('tool_choice must be "auto", "none", "required" or '
                              '{"type": "function", "function": {"name": <one of the tools>}}')
    elif tool_choice not in ("auto", "none", "required"):
        raise SchemaError('tool_choice must be "auto", "none", "required" or a named function')
    return tools, tool_choice


def check_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or len(value) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in value)):
        raise SchemaError(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} "
                          f"non-empty strings of at most {MAX_STOP_CHARS} characters")
    return tuple(dict.fromkeys(value))


# -- grammars -----------------------------------------------------------------------------------


INT_DIGITS = 16  # as the converter's own integer rule: at most 16 digits


def _digit_ranges(low: int, high: int) -> list[str]:
    """GBNF alternatives matching exactly the decimal numbers low..high (0 <= low <= high):
    split into runs that share a prefix and end in whole digit ranges (as to-regex-range)."""

    def nines(value: int, n: int) -> int:
        text = str(value)
        return int(text[:-n] + "9" * n) if n < len(text) else int("9" * n)

    stops = {high}
    n = 1
    while low <= (stop := nines(low, n)) < high:
        stops.add(stop)
        n += 1
    n = 1
    while low < (stop := (high + 1) - (high + 1) % 10**n - 1) <= high:
        stops.add(stop)
        n += 1
    out, start = [], low
    for stop in sorted(stops):
        parts = []
        for a, b in zip(str(start), str(stop), strict=True):
            parts.append(f'"{a}"' if a == b else f"[{a}-{b}]")
        out.append(" ".join(parts))
        start = stop + 1
    return out


def integer_rule(schema: dict[str, Any]) -> str:
    """An integer between the schema's bounds (missing ones: 16 digits), exactly."""
    limit = 10**INT_DIGITS - 1
    low = schema.get("minimum", -limit)
    high = schema.get("maximum", limit)
    if isinstance(schema.get("exclusiveMinimum"), int | float):
        low = max(low, int(schema["exclusiveMinimum"]) + 1)
    if isinstance(schema.get("exclusiveMaximum"), int | float):
        high = min(high, -int(-schema["exclusiveMaximum"]) - 1)
    low, high = -(-low // 1), high // 1  # whole numbers inside fractional bounds
    low, high = max(int(low), -limit), min(int(high), limit)
    if low > high:
        raise SchemaError(f"no integer lies between {low} and {high}")
    alternatives = []
    if low < 0:
        alternatives += [f'"-" {p}' for p in _digit_ranges(max(1, -high), -low)]
    if high >= 0:
        alternatives += _digit_ranges(max(0, low), high)
    return "(" + " | ".join(f"({a})" for a in alternatives) + ") space"


def _converter():
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):
        """The vendored converter ignores integer bounds (its own TODO); llama.cpp's C++ one
        enforces them. Enforced here too, or a schema's "maximum": 9 would let 4343434343
        through."""

        def visit(self, schema, name):
            bounds = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
            if isinstance(schema, dict) and schema.get("type") == "integer" and any(
                    isinstance(schema.get(b), int | float) and not isinstance(schema.get(b), bool)
                    for b in bounds):
                rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, integer_rule(schema))
            return super().visit(schema, name)

    return Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _rules(schema: dict[str, Any], name: str) -> str:
    """GBNF rules for ``schema``, its top rule called ``name`` ("" for root)."""
    converter = _converter()
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "request")
        converter.visit(resolved, name)
        grammar = converter.format_grammar()
    except RecursionError:
        raise SchemaError("the JSON schema nests too deeply to be turned into a grammar") from None
    except SchemaError:
        raise
    except Exception as exc:  # the converter reports with asserts and KeyErrors
        raise SchemaError(f"the JSON schema cannot be turned into a grammar: "
                          f"{str(exc)[:200] or type(exc).__name__}") from None
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)


def _tool_schema(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def build_grammar(response_format: dict[str, Any] | None, tools: list[dict[str, Any]] | None,
                  tool_choice: Any) -> str | None:
    """The GBNF a reply must follow, or None for free text. SchemaError says why not."""
    if tools and tool_choice != "none":
        if isinstance(tool_choice, dict):
            name = tool_choice["function"]["name"]
            tools = [t for t in tools if t["function"]["name"] == name]
        schema = (_tool_schema(tools[0]) if len(tools) == 1
                  else {"anyOf": [_tool_schema(t) for t in tools]})
        call = f'tool-call ::= "{TOOL_OPEN}\\n" tool-json "\\n{TOOL_CLOSE}"'
        rules = _rules(schema, "tool-json")
        if tool_choice == "auto":
            root = "root ::= tool-call | free-text\nfree-text ::= ([^<] .*)?"
        else:
            root = "root ::= tool-call"
        return f"{root}\n{call}\n{rules}"
    if response_format is None:
        return None
    if response_format["type"] == "json_object":
        return _rules(response_format.get("schema") or {"type": "object"}, "")
    return _rules(response_format["json_schema"]["schema"], "")


# -- messages for a chat template ------------------------------------------------------------


def message_text(content: Any) -> str:
    """OpenAI content: a string, null, or a list of parts of which the text ones count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content
                   if isinstance(p, dict) and p.get("type", "text") == "text")


def _tool_call_text(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_OPEN}\n{body}\n{TOOL_CLOSE}"


def tool_instructions(tools: list[dict[str, Any]], tool_choice: Any) -> str:
    listed = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    if tool_choice == "required":
        when = "You must call one of these functions."
    elif isinstance(tool_choice, dict):
        when = f"You must call the function {tool_choice['function']['name']}."
    else:
        when = "Call a function when it helps answer; otherwise reply normally."
    return (f"You can call functions. {when} The functions, as JSON schemas:\n{listed}\n"
            f"To call one, reply with only:\n{TOOL_OPEN}\n"
            '{"name": <function name>, "arguments": <arguments as a JSON object>}\n'
            f"{TOOL_CLOSE}\nA function's result comes back inside <tool_response></tool_response>.")


def render_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    tool_choice: Any = None) -> list[dict[str, str]]:
    """Messages any chat template accepts (system/user/assistant, text only): tool calls and
    tool results become text in the convention above, consecutive tool results one user turn,
    and the tool list a part of the system message."""
    out: list[dict[str, str]] = []
    for m in messages:
        role = m.get("role")
        text = message_text(m.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_tool_call_text(c) for c in m["tool_calls"])
            text = f"{text}\n{calls}" if text else calls
        if role == "tool":
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].endswith("</tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}
                continue
        out.append({"role": role, "content": text})
    if tools and tool_choice != "none":
        extra = tool_instructions(tools, tool_choice)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{extra}"}
        else:
            out.insert(0, {"role": "system", "content": extra})
    return out


# -- reading replies back ----------------------------------------------------------------------


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` from ``<tool_call>`` blocks; None unless all of them parse."""
    blocks = re.findall(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CLOSE), text, re.S)
    if not blocks:
        return None
    calls = []
    for block in blocks:
        try:
            data = json.loads(block)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        arguments = data.get("arguments", {})
        calls.append({"id": "call_" + secrets.token_hex(12), "type": "function",
                      "function": {"name": data["name"],
                                   "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ReplySplitter:
    """Splits a reply's text, as it streams, into reasoning (``<think>…</think>`` at the
    start) and content, and holds back a reply that is a tool call until it is complete.

    ``feed`` returns ("reasoning" | "content", text) pieces ready to send; ``finish`` returns
    the last pieces and the tool calls (None when the reply was text)."""

    tools: bool = False
    state: str = "start"
    buffer: str = ""
    thought: bool = False
    pieces: list[tuple[str, str]] = field(default_factory=list)

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        out: list[tuple[str, str]] = []
        while self.buffer:
            if self.state == "content":
                out.append(("content", self.buffer))
                self.buffer = ""
            elif self.state == "tool":
                break  # the whole call is sent at the end
            elif self.state == "think":
                end = self.buffer.find(THINK_CLOSE)
                if end >= 0:
                    if end:
                        out.append(("reasoning", self.buffer[:end]))
                    self.buffer = self.buffer[end + len(THINK_CLOSE):].lstrip()
                    self.state = "start"
                    continue
                keep = _partial_suffix(self.buffer, THINK_CLOSE)
                ready = self.buffer[: len(self.buffer) - keep]
                if ready:
                    out.append(("reasoning", ready))
                self.buffer = self.buffer[len(ready):]
                break
            else:  # start: decide what the reply is once its first characters say so
                head = self.buffer.lstrip()
                markers = [] if self.thought else [THINK_OPEN]
                if self.tools:
                    markers.append(TOOL_OPEN)
                if not head or any(m.startswith(head) and m != head for m in markers):
                    break  # could still become a marker: wait for more
                if not self.thought and head.startswith(THINK_OPEN):
                    self.thought = True
                    self.state, self.buffer = "think", head[len(THINK_OPEN):].lstrip("\n")
                elif self.tools and head.startswith(TOOL_OPEN):
                    self.state, self.buffer = "tool", head
                    break
                else:
                    self.state = "content"
                    if self.thought:
                        self.buffer = head
        self.pieces.extend(out)
        return out

    def finish(self) -> tuple[list[tuple[str, str]], list[dict[str, Any]] | None]:
        rest, calls = self.buffer, None
        self.buffer = ""
        out: list[tuple[str, str]] = []
        if self.state == "tool":
            calls = parse_tool_calls(rest)
            if calls is None and rest:  # cut short or malformed: it stays visible as text
                out.append(("content", rest))
        elif rest:
            out.append(("reasoning" if self.state == "think" else "content", rest))
        self.pieces.extend(out)
        return out, calls

    def joined(self, kind: str) -> str:
        return "".join(text for k, text in self.pieces if k == kind)


def split_reply(text: str, tools: bool = False) -> tuple[str, str | None, list[dict[str, Any]] | None]:
    """(content, reasoning or None, tool calls or None) of a finished reply."""
    splitter = ReplySplitter(tools=tools)
    splitter.feed(text)
    _, calls = splitter.finish()
    reasoning = splitter.joined("reasoning")
    return splitter.joined("content"), (reasoning or None), calls


class StopMatcher:
    """Cuts a stream of text at the first of the ``stop`` strings, holding back any end of
    the text that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        joined = self.pending + text
        hits = [i for i in (joined.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return joined[: min(hits)], True
        keep = max(_partial_suffix(joined, s) for s in self.stops)
        self.pending = joined[len(joined) - keep:] if keep else ""
        return joined[: len(joined) - keep], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
