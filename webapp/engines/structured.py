"""Structured replies on the embedded engines: JSON schemas, tool calls, stop strings, thinking.

llama.cpp can only be *made* to follow a format by grammar-constrained sampling: a GBNF grammar
(from llama.cpp's JSON-schema-to-grammar converter, as vendored in llama-cpp-python) sits at
the head of a request's sampler chain and masks every token that would break it. This module
builds those grammars from OpenAI's ``response_format`` and ``tools``/``tool_choice``, hands the
tools to a chat template with a tools section (or writes short instructions and the tool turns
into messages a plain chat template accepts), and reads a
finished (or streaming) reply back into content, reasoning and tool calls. It knows nothing of
HTTP; upstream engines never use it (they get ``response_format`` and ``tools`` as given).

Tool calls come in the formats of CALL_FORMATS, each described once (CallFormat): the Hermes/Qwen
convention many small models were trained on, and bchat's own instructions describe::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and Llama 3.1+'s bare JSON object, for a model whose own template writes calls so::

    {"name": "get_weather", "parameters": {"city": "Paris"}}

With ``tool_choice`` "required" or a named function the grammar allows only a call; with
"auto" it allows either that or free text that does not start as one.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
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


# -- limits on schemas ---------------------------------------------------------------------------
#
# A schema becomes a grammar that llama.cpp parses (recursively: one C stack frame per nested
# group) and then runs for every token of the reply. Its cost there grows with how many ways the
# reply written so far can be read at once (llama.cpp keeps one "stack" per way and checks every
# vocabulary entry against each): `^((a{0,50}){0,50}){0,50}$` is a 1 KB grammar that took seconds
# a token. So a schema is checked here, before anything reaches native code, and refused with a
# message naming the limit. The README's Security section lists these values.

MAX_SCHEMA_CHARS = 64_000  # a schema (or a tool's parameters) as compact JSON
MAX_SCHEMA_DEPTH = 24  # subschemas inside subschemas
MAX_SCHEMA_NODES = 2_000  # subschemas, counting each place a $ref is used
MAX_PROPERTIES = 128  # properties of one object, entries of one tuple (prefixItems)
MAX_ENUM = 256  # values of one enum
MAX_ALTERNATIVES = 64  # entries of one anyOf/oneOf/allOf
MAX_LITERAL_CHARS = 1_000  # a property name, a const or an enum value (as JSON)
MAX_REPEAT = 1_000  # minLength/maxLength, minItems/maxItems, and {m,n} in a pattern
MAX_PATTERN_CHARS = 1_000  # one pattern
MAX_PATTERN_POSITIONS = 4_000  # characters a pattern matches once its {m,n} are written out
MAX_REF_DEPTH = 16  # $refs followed one inside another
MAX_AMBIGUITY = 16  # ways a reply can be read at once (overlapping anyOf, ambiguous patterns)
MAX_GRAMMAR_CHARS = 200_000  # the GBNF grammar made from a schema or tools
MAX_GRAMMAR_RULES = 2_000  # rules of that grammar
# Groups inside groups in that grammar: llama.cpp's parser recurses on each, ~0.5 KB of C stack
# a level (1,100 levels crash a 256 KB thread stack, pass in 512 KB; glibc threads get 8 MB).
MAX_GRAMMAR_NESTING = 1_100

_START_CLASSES = frozenset('n{["0t')  # what a JSON value can start with: null, {, [, ", digit, t/f
_TYPE_STARTS = {"null": "n", "object": "{", "array": "[", "string": '"', "number": "0",
                "integer": "0", "boolean": "t"}
_BOUND_KEYS = ("minLength", "maxLength", "minItems", "maxItems")


def _value_start(value: Any) -> str:
    if isinstance(value, dict):
        return "{"  # a const object: told apart by its text anyway, but cheaply said "any"
    text = json.dumps(value)
    return {"f": "t", "-": "0"}.get(text[0], "0" if text[0].isdigit() else text[0])


def check_schema(schema: Any, what: str = "the JSON schema") -> None:
    """SchemaError unless ``schema`` is within every limit above."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{what} must be an object")
    try:
        size = len(json.dumps(schema, separators=(",", ":")))
    except (TypeError, ValueError, RecursionError):
        raise SchemaError(f"{what} is not plain JSON") from None
    if size > MAX_SCHEMA_CHARS:
        raise SchemaError(f"{what} is {size} characters; the limit is {MAX_SCHEMA_CHARS}")
    _SchemaWalk(schema, what).visit(schema, 0, 1, ())


class _SchemaWalk:
    def __init__(self, root: dict[str, Any], what: str) -> None:
        self.root, self.what, self.nodes = root, what, 0
        self.seen: set[tuple[str, int]] = set()

    def refuse(self, text: str) -> SchemaError:
        return SchemaError(f"{self.what}: {text}")

    def resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.refuse(f"$ref {str(ref)[:80]!r} is not a local reference (#/...)")
        target: Any = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise self.refuse(f"$ref {ref[:80]!r} points at nothing")
            target = target[part]
        return target

    def starts(self, schema: Any, refs: tuple[str, ...] = ()) -> frozenset[str]:
        """What a value of ``schema`` can start with: "n", "[", '"', "0" (a number), "t" (a
        boolean), "{" (any object) or "{" and its first key (and that key's const value), as
        the converter writes required properties first. All of them when unsure."""
        if not isinstance(schema, dict):
            return _START_CLASSES
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref in refs or len(refs) >= MAX_REF_DEPTH:
                return _START_CLASSES
            return self.starts(self.resolve(ref), refs + (ref,))
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if isinstance(values, list):
                return frozenset(_value_start(v) for v in values)
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                out: frozenset[str] = frozenset()
                for alternative in schema[key]:
                    out |= self.starts(alternative, refs)
                return out
        kind = schema.get("type")
        kinds = kind if isinstance(kind, list) else [kind]
        properties, required = schema.get("properties"), schema.get("required")
        if kinds == ["object"] or (kind is None and isinstance(properties, dict)):
            if isinstance(properties, dict) and isinstance(required, list):
                first = next((k for k in properties if k in required), None)
                if first is not None:
                    sub = properties[first]
                    value = (":" + json.dumps(sub["const"]) if isinstance(sub, dict)
                             and "const" in sub else "")
                    return frozenset(["{" + json.dumps(first) + value])
            return frozenset("{")
        if all(k in _TYPE_STARTS for k in kinds):
            return frozenset(_TYPE_STARTS[k] for k in kinds)
        if "items" in schema or "prefixItems" in schema:
            return frozenset("[")
        if "pattern" in schema:
            return frozenset('"')
        return _START_CLASSES

    def visit(self, schema: Any, depth: int, ambiguity: int,
              refs: tuple[tuple[str, int], ...]) -> None:
        if isinstance(schema, bool):
            return
        if not isinstance(schema, dict):
            raise self.refuse("every subschema must be an object")
        self.nodes += 1
        if self.nodes > MAX_SCHEMA_NODES:
            raise self.refuse(f"more than {MAX_SCHEMA_NODES} subschemas (counting each use of a "
                              f"$ref); the limit is {MAX_SCHEMA_NODES}")
        if depth > MAX_SCHEMA_DEPTH:
            raise self.refuse(f"subschemas nest more than {MAX_SCHEMA_DEPTH} deep")
        if "$ref" in schema:
            ref = schema["$ref"]
            target = self.resolve(ref)
            entered = dict(refs).get(ref)
            if entered is not None:
                if ambiguity > entered:  # each round of the recursion multiplies the readings
                    raise self.refuse(f"$ref {ref[:80]!r} recurses through overlapping anyOf "
                                      f"alternatives, so a reply could be read ever more ways "
                                      f"at once; the limit is {MAX_AMBIGUITY}")
                return  # recursion: the rest of the walk covers it; the grammar loops there
            if len(refs) >= MAX_REF_DEPTH:
                raise self.refuse(f"$refs lead through more than {MAX_REF_DEPTH} others; the "
                                  f"limit is {MAX_REF_DEPTH}")
            if (ref, ambiguity) not in self.seen:
                self.seen.add((ref, ambiguity))
                self.visit(target, depth + 1, ambiguity, refs + ((ref, ambiguity),))
            return
        for key in _BOUND_KEYS:
            value = schema.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPEAT:
                raise self.refuse(f"{key} must be an integer from 0 to {MAX_REPEAT} (the repetition "
                                  f"limit)")
        for low, high in (("minLength", "maxLength"), ("minItems", "maxItems")):
            if schema.get(high) is not None and (schema.get(low) or 0) > schema[high]:
                raise self.refuse(f"{low} is above {high}")
        if "const" in schema:
            self.literal(schema["const"], "const")
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not 0 < len(values) <= MAX_ENUM:
                raise self.refuse(f"enum must be a list of 1 to {MAX_ENUM} values (the enum limit)")
            for value in values:
                self.literal(value, "an enum value")
        kind = schema.get("type")
        if isinstance(kind, list) and len(kind) > len(_TYPE_STARTS):
            raise self.refuse("type lists too many types")
        if isinstance(kind, list):
            ambiguity *= self.overlap([{"type": k} for k in kind])
        pattern = schema.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
                raise self.refuse(f"pattern must be a string of at most {MAX_PATTERN_CHARS} "
                                  f"characters")
            try:
                states = pattern_ambiguity(pattern)
            except SchemaError as exc:
                raise self.refuse(str(exc)) from None
            self.ambiguous(ambiguity * states)
        properties = schema.get("properties")
        if properties is not None:
            if not isinstance(properties, dict) or len(properties) > MAX_PROPERTIES:
                raise self.refuse(f"properties must be an object of at most {MAX_PROPERTIES} "
                                  f"(the property limit)")
            for name, sub in properties.items():
                if len(name) > MAX_LITERAL_CHARS:
                    raise self.refuse(f"a property name is over {MAX_LITERAL_CHARS} characters")
                self.visit(sub, depth + 1, ambiguity, refs)
        required = schema.get("required")
        if required is not None and (not isinstance(required, list)
                                     or not all(isinstance(r, str) for r in required)):
            raise self.refuse("required must be a list of property names")
        if isinstance(schema.get("additionalProperties"), dict):
            self.visit(schema["additionalProperties"], depth + 1, ambiguity, refs)
        for key in ("items", "prefixItems"):
            items = schema.get(key)
            if isinstance(items, list):
                if len(items) > MAX_PROPERTIES:
                    raise self.refuse(f"{key} lists more than {MAX_PROPERTIES} schemas")
                for sub in items:
                    self.visit(sub, depth + 1, ambiguity, refs)
            elif items is not None:
                self.visit(items, depth + 1, ambiguity, refs)
        for key in ("anyOf", "oneOf", "allOf"):
            alternatives = schema.get(key)
            if alternatives is None:
                continue
            if not isinstance(alternatives, list) or not 0 < len(alternatives) <= MAX_ALTERNATIVES:
                raise self.refuse(f"{key} must list 1 to {MAX_ALTERNATIVES} schemas")
            inner = ambiguity * (self.overlap(alternatives) if key != "allOf" else 1)
            self.ambiguous(inner)
            for sub in alternatives:
                self.visit(sub, depth + 1, inner, refs)
        for key in ("$defs", "definitions"):
            if isinstance(schema.get(key), dict):
                for sub in schema[key].values():
                    self.visit(sub, depth + 1, 1, refs)

    def overlap(self, alternatives: list[Any]) -> int:
        """How many of the alternatives a value can start as at once (an object with a
        different first key, or a different const there, is told apart at once)."""
        starts = [self.starts(alternative) for alternative in alternatives]
        worst = 1
        for start in frozenset().union(*starts):
            count = sum(1 for mine in starts if any(
                a == start or (a == "{" and start.startswith("{")) or (start == "{" and a.startswith("{"))
                or (a.startswith(start + ":") or start.startswith(a + ":")) for a in mine))
            worst = max(worst, count)
        return worst

    def ambiguous(self, ways: int) -> None:
        if ways > MAX_AMBIGUITY:
            raise self.refuse(f"a reply could be read {ways} ways at once (overlapping anyOf "
                              f"alternatives or an ambiguous pattern); the limit is {MAX_AMBIGUITY}")

    def literal(self, value: Any, what: str) -> None:
        if len(json.dumps(value)) > MAX_LITERAL_CHARS:
            raise self.refuse(f"{what} is over {MAX_LITERAL_CHARS} characters as JSON")


# -- patterns -------------------------------------------------------------------------------------
#
# The converter writes a pattern's {m,n} out in full (`a{0,3}` becomes `("a" ("a" ("a")?)?)?`)
# and llama.cpp follows every way the text so far can match at once. So a pattern is parsed
# here (the converter's subset of regular expressions), written out the same way into an
# automaton of at most MAX_PATTERN_POSITIONS characters, and run over every class of input
# character to find how many positions can be live at once.

_MAX_CHAR = 0x10FFFF
_PATTERN_WORK = 400_000  # steps the ambiguity search may take before the pattern is refused
_CLASS_ESCAPES = {"d": ((48, 57),), "w": ((48, 57), (65, 90), (95, 95), (97, 122)),
                  "s": ((9, 13), (32, 32))}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


def _normalize(ranges) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return tuple(out)


def _negate(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for low, high in sorted(ranges):
        if low > start:
            out.append((start, low - 1))
        start = max(start, high + 1)
    if start <= _MAX_CHAR:
        out.append((start, _MAX_CHAR))
    return tuple(out)


class _PatternParser:
    """``^…$`` into a tree: ("set", ranges) | ("seq", [..]) | ("alt", [..]) | ("rep", node, m, n)."""

    def __init__(self, pattern: str) -> None:
        if not (pattern.startswith("^") and pattern.endswith("$")) or len(pattern) < 2:
            raise SchemaError("a pattern must start with ^ and end with $")
        self.text, self.i = pattern[1:-1], 0

    def parse(self):
        node = self.alternation()
        if self.i < len(self.text):
            raise SchemaError(f"unbalanced ) at {self.i + 1} in the pattern")
        return node

    def alternation(self):
        branches = [self.sequence()]
        while self.i < len(self.text) and self.text[self.i] == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items = []
        while self.i < len(self.text) and self.text[self.i] not in "|)":
            atom = self.atom()
            while self.i < len(self.text) and self.text[self.i] in "*+?{":
                atom = self.quantifier(atom)
            items.append(atom)
        return ("seq", items)

    def atom(self):
        c = self.text[self.i]
        self.i += 1
        if c == "(":
            if self.text.startswith("?:", self.i):
                self.i += 2
            elif self.text.startswith("?", self.i):
                raise SchemaError("a pattern may not use (?…) groups other than (?:…)")
            node = self.alternation()
            if self.i >= len(self.text) or self.text[self.i] != ")":
                raise SchemaError("unbalanced ( in the pattern")
            self.i += 1
            return node
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", _negate(((10, 10), (13, 13))))
        if c == "\\":
            return ("set", self.escape())
        if c in "*+?{":
            raise SchemaError(f"nothing to repeat before {c} in the pattern")
        return ("set", ((ord(c), ord(c)),))

    def escape(self) -> tuple[tuple[int, int], ...]:
        if self.i >= len(self.text):
            raise SchemaError("a pattern may not end with \\")
        c = self.text[self.i]
        self.i += 1
        if c.lower() in _CLASS_ESCAPES:
            ranges = _CLASS_ESCAPES[c.lower()]
            return _negate(ranges) if c.isupper() else ranges
        c = _CHAR_ESCAPES.get(c, c)
        return ((ord(c), ord(c)),)

    def char_class(self) -> tuple[tuple[int, int], ...]:
        negated = self.text.startswith("^", self.i)
        self.i += negated
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.i >= len(self.text):
                raise SchemaError("unbalanced [ in the pattern")
            c = self.text[self.i]
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            self.i += 1
            if c == "\\":
                escaped = self.escape()
                if len(escaped) != 1 or escaped[0][0] != escaped[0][1]:
                    ranges.extend(escaped)
                    continue
                low = escaped[0][0]
            else:
                low = ord(c)
            high = low
            if self.text.startswith("-", self.i) and self.i + 1 < len(self.text) \
                    and self.text[self.i + 1] != "]":
                self.i += 1
                end = self.text[self.i]
                self.i += 1
                if end == "\\":
                    escaped = self.escape()
                    end = chr(escaped[0][0])
                high = ord(end)
                if high < low:
                    raise SchemaError("a character range in the pattern runs backwards")
            ranges.append((low, high))
        return _negate(tuple(ranges)) if negated else tuple(ranges)

    def quantifier(self, atom):
        c = self.text[self.i]
        self.i += 1
        if c == "*":
            low, high = 0, None
        elif c == "+":
            low, high = 1, None
        elif c == "?":
            low, high = 0, 1
        else:
            end = self.text.find("}", self.i)
            if end < 0:
                raise SchemaError("unbalanced { in the pattern")
            body, self.i = self.text[self.i:end], end + 1
            parts = [p.strip() for p in body.split(",")]
            try:
                if len(parts) == 1:
                    low = high = int(parts[0])
                elif len(parts) == 2:
                    low = int(parts[0]) if parts[0] else 0
                    high = int(parts[1]) if parts[1] else None
                else:
                    raise ValueError
            except ValueError:
                raise SchemaError(f"{{{body[:20]}}} is not a repetition in the pattern") from None
            if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
                raise SchemaError(f"the pattern repeats something up to {max(low, high or 0)} "
                                  f"times; the repetition limit is {MAX_REPEAT}")
            if high is not None and high < low:
                raise SchemaError(f"{{{body[:20]}}} in the pattern runs backwards")
        if self.text.startswith("?", self.i):
            raise SchemaError("a pattern may not use lazy repetition (*?, +?, ??)")
        return ("rep", atom, low, high)


class _Automaton:
    """A Thompson automaton: ``chars[s]`` the ranges state s reads (None: an empty step),
    ``moves[s]`` where it goes from there."""

    def __init__(self) -> None:
        self.chars: list[tuple[tuple[int, int], ...] | None] = []
        self.moves: list[list[int]] = []
        self.positions = 0

    def state(self, chars=None) -> int:
        if chars is not None:
            self.positions += 1
            if self.positions > MAX_PATTERN_POSITIONS:
                raise SchemaError(f"the pattern matches more than {MAX_PATTERN_POSITIONS} "
                                  f"characters once its repetitions are written out (nested "
                                  f"repetition?); the limit is {MAX_PATTERN_POSITIONS}")
        self.chars.append(chars)
        self.moves.append([])
        return len(self.chars) - 1

    def build(self, node) -> tuple[int, int]:
        kind = node[0]
        if kind == "set":
            start, end = self.state(_normalize(node[1])), self.state()
            self.moves[start].append(end)
            return start, end
        if kind == "seq":
            start = end = self.state()
            for item in node[1]:
                a, b = self.build(item)
                self.moves[end].append(a)
                end = b
            return start, end
        if kind == "alt":
            start, end = self.state(), self.state()
            for branch in node[1]:
                a, b = self.build(branch)
                self.moves[start].append(a)
                self.moves[b].append(end)
            return start, end
        _, item, low, high = node
        start = end = self.state()
        for _ in range(low):
            a, b = self.build(item)
            self.moves[end].append(a)
            end = b
        if high is None:  # a loop
            a, b = self.build(item)
            self.moves[end].append(a)
            self.moves[b].append(a)
            after = self.state()
            self.moves[end].append(after)
            self.moves[b].append(after)
            return start, after
        skips = []
        for _ in range(high - low):
            a, b = self.build(item)
            self.moves[end].append(a)
            skips.append(end)
            end = b
        for skip in skips:
            self.moves[skip].append(end)
        return start, end

    def closure(self, states) -> frozenset[int]:
        """The reading states reachable from ``states`` by empty steps."""
        out, todo, seen = set(), list(states), set(states)
        while todo:
            s = todo.pop()
            if self.chars[s] is not None:
                out.add(s)
                continue
            for t in self.moves[s]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(out)


def pattern_ambiguity(pattern: str) -> int:
    """The most positions of ``pattern`` that can be live at once (1 for an unambiguous one);
    SchemaError when it breaks a limit or is too tangled to tell."""
    import bisect

    automaton = _Automaton()
    start, _ = automaton.build(_PatternParser(pattern).parse())
    first = automaton.closure([start])
    seen, todo, worst, work = {first}, [first], len(first), 0
    while todo:
        states = todo.pop()
        bounds = sorted({b for s in states for low, high in automaton.chars[s]
                         for b in (low, high + 1)})
        work += len(bounds) * len(states)
        if work > _PATTERN_WORK:
            raise SchemaError("the pattern is too tangled to check; simplify it")
        for char in bounds:
            targets = []
            for s in states:
                ranges = automaton.chars[s]
                k = bisect.bisect_right(ranges, (char, _MAX_CHAR + 1)) - 1
                if k >= 0 and ranges[k][0] <= char <= ranges[k][1]:
                    targets.extend(automaton.moves[s])
            if not targets:
                continue
            following = automaton.closure(targets)
            worst = max(worst, len(following))
            if worst > MAX_AMBIGUITY:
                return worst
            if following not in seen:
                seen.add(following)
                todo.append(following)
    return worst


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
        if schema is not None:
            check_schema(schema, "response_format.schema")
        return value
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise SchemaError('response_format json_schema needs {"json_schema": {"name": …, '
                              '"schema": {…}}}')
        check_schema(spec["schema"])
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
        if parameters is not None:
            check_schema(parameters, f"the parameters of {name!r}")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise SchemaError(f"the description of {name!r} must be a string")
    size = len(json.dumps(tools, separators=(",", ":")))
    if size > MAX_SCHEMA_CHARS:  # they all go into the prompt, and into one grammar
        raise SchemaError(f"the tools are {size} characters as JSON; the limit is "
                          f"{MAX_SCHEMA_CHARS}")
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


def build_grammar(response_format: dict[str, Any] | None, tools: list[dict[str, Any]] | None,
                  tool_choice: Any, call_format: CallFormat | None = None) -> str | None:
    """The GBNF a reply must follow, or None for free text, within the grammar limits and
    compiled once by llama.cpp to see that it compiles. SchemaError says why not. Tool calls
    in ``call_format`` (default: bchat's own, HERMES)."""
    grammar = _grammar_text(response_format, tools, tool_choice, call_format or HERMES)
    if grammar is not None:
        check_grammar(grammar)
    return grammar


def answer_grammar(response_format: dict[str, Any] | None,
                   call_format: CallFormat | None = None) -> str | None:
    """What the tool loop's last reply (no calls left: tool_choice "none") is held to: its
    response format, else the free-text branch of "auto" (text that cannot be taken for the
    start of a call). Free of any grammar, a small model past the step limit writes a
    ``<tool_call>`` block as its answer (SmolLM2 did, in the page)."""
    if response_format is not None:
        return build_grammar(response_format, None, "none")
    return f"root ::= ({(call_format or HERMES).free_start} .*)?"


def check_grammar(grammar: str) -> None:
    """SchemaError unless llama.cpp can compile ``grammar`` cheaply: size, rules and nesting
    within the limits (its parser recurses once per nested group: 100,000 of them crashed
    the process), then a compilation without a vocabulary (a millisecond at the limits),
    here in the request's thread rather than on a model's inference thread."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise SchemaError(f"the grammar made from this schema is {len(grammar)} characters; the "
                          f"limit is {MAX_GRAMMAR_CHARS}")
    rules = grammar.count("::=")
    if rules > MAX_GRAMMAR_RULES:
        raise SchemaError(f"the grammar made from this schema has {rules} rules; the limit is "
                          f"{MAX_GRAMMAR_RULES}")
    nesting = _grammar_nesting(grammar)
    if nesting > MAX_GRAMMAR_NESTING:
        raise SchemaError(f"the grammar made from this schema nests {nesting} groups deep; the "
                          f"limit is {MAX_GRAMMAR_NESTING}")
    from llama_cpp import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise SchemaError("llama.cpp cannot compile the grammar made from this schema (a "
                          "pattern it does not support, or a repetition it finds too large)")
    llama_cpp.llama_sampler_free(sampler)


def _grammar_nesting(grammar: str) -> int:
    """How deep ( groups nest in GBNF text, outside "literals" and [classes]."""
    depth = deepest = 0
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


def _grammar_text(response_format: dict[str, Any] | None, tools: list[dict[str, Any]] | None,
                  tool_choice: Any, call_format: CallFormat) -> str | None:
    if tools and tool_choice != "none":
        return call_format.grammar(tools, tool_choice)
    if response_format is None:
        return None
    if response_format["type"] == "json_object":
        return _rules(response_format.get("schema") or {"type": "object"}, "")
    return _rules(response_format["json_schema"]["schema"], "")


def model_grammar(options: Any, tool_style: str | None) -> str | None:
    """The grammar a request is held to on a model whose template writes calls in
    ``tool_style`` (template_tool_style): ``options.grammar``, which options.py built (and
    checked) in bchat's own call format, unless the template's format is another."""
    call_format = CALL_FORMATS.get(tool_style or "", HERMES)
    if call_format is HERMES or not options.tools:
        return options.grammar
    if options.tool_choice == "none":
        if options.grammar is not None and options.response_format is None:
            return answer_grammar(None, call_format)  # the tool loop's last reply, this format
        return options.grammar
    return build_grammar(options.response_format, options.tools, options.tool_choice, call_format)


# -- tool-call formats ---------------------------------------------------------------------------


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)  # a GBNF string literal escapes as JSON does ("\n", "\"")


@dataclass(frozen=True)
class CallFormat:
    """One way a model writes a tool call, described once: what the grammar lets a reply be
    (``grammar``), how a chat template is seen to write it (``found``, for the probe of
    template_tool_style) and how a reply is read back (``opens``, ``reply_calls``)."""

    name: str
    arguments_key: str  # what the call's JSON object names the arguments
    open: str  # the text around the JSON object; "" for a bare object
    close: str
    free_start: str  # GBNF class free text starts with beside a call (tool_choice "auto")
    openings: tuple[str, ...]  # how a reply that is a call starts, whitespace left out
    calls_per_turn: int | None = None  # the most its templates take in one message

    def tool_schema(self, tool: dict[str, Any]) -> dict[str, Any]:
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        # The converter writes required properties in this order: "name" first, as models do.
        return {"type": "object", "properties": {"name": {"const": function["name"]},
                                                 self.arguments_key: parameters},
                "required": ["name", self.arguments_key], "additionalProperties": False}

    def grammar(self, tools: list[dict[str, Any]], tool_choice: Any) -> str:
        """One call of one of ``tools`` (the named one for a named ``tool_choice``), or with
        "auto" free text that cannot be taken for the start of a call."""
        if isinstance(tool_choice, dict):
            name = tool_choice["function"]["name"]
            tools = [t for t in tools if t["function"]["name"] == name]
        schema = (self.tool_schema(tools[0]) if len(tools) == 1
                  else {"anyOf": [self.tool_schema(t) for t in tools]})
        parts = [_gbnf_literal(self.open)] if self.open else []
        parts += ["tool-json"] + ([_gbnf_literal(self.close)] if self.close else [])
        call = "tool-call ::= " + " ".join(parts)
        if tool_choice == "auto":
            root = f"root ::= tool-call | free-text\nfree-text ::= ({self.free_start} .*)?"
        else:
            root = "root ::= tool-call"
        return f"{root}\n{call}\n{_rules(schema, 'tool-json')}"

    def text(self, name: Any, arguments: Any) -> str:
        body = json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)
        return f"{self.open}{body}{self.close}"

    def call(self, data: Any) -> tuple[str, Any] | None:
        """(name, arguments) of a decoded JSON value that is a call in this format. A bare
        object must hold nothing else (llama.cpp's optional "type": "function" aside): any
        other JSON a model writes is its reply."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        if not self.open and (set(data) - {"name", self.arguments_key, "type"}
                              or data.get("type", "function") != "function"
                              or not isinstance(data.get(self.arguments_key), dict)):
            return None
        return data["name"], data.get(self.arguments_key, {})

    def _values(self, text: str, whole: bool) -> list[Any] | None:
        """The JSON values this format wraps in a reply (``whole``: None when one does not
        parse), or in any text (those that parse): each block between open and close; for a
        bare format the reply as one object, or every object in the text."""
        if self.open:
            blocks = re.findall(re.escape(self.open.strip()) + r"\s*(.*?)\s*"
                                + re.escape(self.close.strip()), text, re.S)
            out = []
            for block in blocks:
                try:
                    out.append(json.loads(block))
                except ValueError:
                    if whole:
                        return None
            return out
        if whole:
            try:
                return [json.loads(text)]
            except ValueError:
                return None
        decoder, out = json.JSONDecoder(), []
        for match in re.finditer(r"\{", text):
            try:
                out.append(decoder.raw_decode(text, match.start())[0])
            except ValueError:
                continue
        return out

    def found(self, text: str) -> list[tuple[str, Any]]:
        """The calls written in this format anywhere in ``text`` (a rendered prompt)."""
        return [c for c in map(self.call, self._values(text, False) or []) if c]

    def reply_calls(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI ``tool_calls`` of a reply written as calls in this format; None unless all
        of them parse."""
        values = self._values(text, True)
        calls = [self.call(v) for v in values or []]
        if not calls or None in calls:
            return None
        return [{"id": "call_" + secrets.token_hex(12), "type": "function",
                 "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
                for name, arguments in calls]

    def opens(self, head: str) -> bool | None:
        """Whether a reply starting with ``head`` (stripped) is a call: None while it could
        still become one."""
        compact = re.sub(r"\s+", "", head)
        if any(compact.startswith(o) for o in self.openings):
            return True
        return None if any(o.startswith(compact) for o in self.openings) else False


HERMES = CallFormat("hermes", "arguments", TOOL_OPEN + "\n", "\n" + TOOL_CLOSE, "[^<]",
                    (TOOL_OPEN,))
# Llama 3.1/3.2/3.3 (their templates write a custom tool's call so, and llama.cpp's
# common_chat_params_init_llama_3_x holds replies to it); <|python_tag|> is only for their
# built-in tools (brave_search, wolfram_alpha, code_interpreter), which bchat does not offer.
LLAMA3 = CallFormat("llama3", "parameters", "", "", "[^{]",
                    ('{"name":"', '{"type":"function","name":"'), calls_per_turn=1)
CALL_FORMATS = {f.name: f for f in (HERMES, LLAMA3)}


# -- messages for a chat template ------------------------------------------------------------


def message_text(content: Any) -> str:
    """OpenAI content: a string, null, or a list of parts of which the text ones count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content
                   if isinstance(p, dict) and p.get("type", "text") == "text")


def call_parts(call: dict[str, Any]) -> tuple[Any, Any]:
    """(name, arguments) of an OpenAI tool call, its arguments as an object where they are
    JSON (templates write them with tojson), as given where not."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return function.get("name"), arguments


def _tool_call_text(call: dict[str, Any]) -> str:
    return HERMES.text(*call_parts(call))


def tool_instructions(tools: list[dict[str, Any]], tool_choice: Any) -> str:
    """bchat's own tool instructions, for a template without a tools section: as few tokens
    as say what the grammar will hold the reply to (compact JSON, one line of how)."""
    listed = json.dumps([t["function"] for t in tools], ensure_ascii=False, separators=(",", ":"))
    if tool_choice == "required":
        when = "Call one."
    elif isinstance(tool_choice, dict):
        when = f"Call {tool_choice['function']['name']}."
    else:
        when = "Call one if it helps, else reply normally."
    return (f"Functions (JSON schemas): {listed}\n{when} To call, reply only "
            f'{TOOL_OPEN}{{"name":…,"arguments":{{…}}}}{TOOL_CLOSE}; '
            "results come in <tool_response>.")


_PROBE_TOOL = {"type": "function", "function": {
    "name": "bchat_probe", "description": "probe",
    "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}
_PROBE_CALL = ("bchat_probe", {"n": 1})


def template_tool_style(template: str, render: Callable[[list, list], str]) -> str | None:
    """The name of the CallFormat a chat template with a tools section writes calls in
    ("hermes": a ``<tool_call>`` block of {"name", "arguments"} JSON, as Qwen2.5, Qwen3 and
    Hermes do; "llama3": a bare {"name", "parameters"} object, as Llama 3.1-3.3 do), else
    None (bchat's own instructions).

    Decided as llama.cpp does (its auto-parser renders the template with a sample call; older
    builds looked for "<tool_call>" in the source, which GLM's, MiniMax's and Qwen3-Coder's
    XML calls also hold): ``render(messages, tools)`` renders a probe tool and a call of it,
    and the call must come back in one of the formats and the tool must be listed."""
    if not re.search(r"\btools\b", template):
        return None
    try:
        text = render([{"role": "user", "content": "x"},
                       {"role": "assistant", "content": "", "tool_calls": [
                           {"id": "call_probe", "type": "function", "function": {
                               "name": _PROBE_CALL[0], "arguments": _PROBE_CALL[1]}}]}],
                      [_PROBE_TOOL])
    except Exception:  # a template that cannot render this is not one to trust with tools
        return None
    if text.count(_PROBE_CALL[0]) < 2:  # the call and the tool's listing
        return None
    return next((f.name for f in CALL_FORMATS.values() if _PROBE_CALL in f.found(text)), None)


def template_messages(messages: list[dict[str, Any]], calls_per_turn: int | None = None
                      ) -> list[dict[str, Any]]:
    """OpenAI messages as a chat template with a tools section reads them (transformers'
    convention, which llama.cpp's --jinja follows): tool calls and results kept as such,
    content as text, a call's arguments as an object (templates write them with tojson).
    ``calls_per_turn``: the most calls the template takes in one assistant message; more
    (parallel calls from another model) become that many turns in a row, not its refusal."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.get("role") == "developer" else m.get("role")
        message: dict[str, Any] = {"role": role, "content": message_text(m.get("content"))}
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                name, arguments = call_parts(call)
                calls.append({"id": call.get("id"), "type": "function",
                              "function": {"name": name, "arguments": arguments}})
            step = calls_per_turn or len(calls)
            turns = [calls[i:i + step] for i in range(0, len(calls), step)]
            for turn in turns[:-1]:  # the text goes with the first
                out.append({**message, "tool_calls": turn})
                message["content"] = ""
            message["tool_calls"] = turns[-1]
        for key in ("tool_call_id", "name"):
            if m.get(key):
                message[key] = m[key]
        out.append(message)
    return out


def prompt_messages(tool_style: str | None, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None, tool_choice: Any
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render with a chat template whose tool style is ``tool_style``
    (template_tool_style): a template with a tools section writes the tools and the tool turns
    itself, in the format the model was trained on and the grammar holds a call to; any other
    gets them as text (render_messages) and no tools."""
    if tool_style:
        return (template_messages(messages, CALL_FORMATS[tool_style].calls_per_turn),
                template_tools(tools, tool_choice))
    return render_messages(messages, tools, tool_choice), None


def template_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> list[dict[str, Any]] | None:
    """The tool list a template renders: OpenAI's shape ({"type": "function", "function": …}),
    none when tool_choice is "none", only the named one when the choice names it."""
    if not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        tools = [t for t in tools if t["function"]["name"] == name]
    return [{"type": "function", "function": t["function"]} for t in tools]


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
    """OpenAI ``tool_calls`` from a reply that is calls in one of CALL_FORMATS (the engine
    that wrote it may be another process or an upstream: the text says which); None unless
    all of them parse."""
    for call_format in CALL_FORMATS.values():
        calls = call_format.reply_calls(text)
        if calls:
            return calls
    return None


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
                calls = [f.opens(head) for f in CALL_FORMATS.values()] if self.tools else []
                if not head or None in calls or (not self.thought and THINK_OPEN.startswith(head)
                                                 and head != THINK_OPEN):
                    break  # could still become a marker: wait for more
                if not self.thought and head.startswith(THINK_OPEN):
                    self.thought = True
                    self.state, self.buffer = "think", head[len(THINK_OPEN):].lstrip("\n")
                elif True in calls:
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
