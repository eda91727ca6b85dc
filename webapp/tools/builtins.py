"""The built-in tools: each one ``Tool`` entry (name, JSON schema, callable, limits).

``calculator`` parses arithmetic with Python's ``ast`` and evaluates only the nodes listed
here (numbers, + - * / // % **, a few math functions and constants): never ``eval``, and with
limits on the expression's length and on the size of a power, so "9**9**9" is refused
instead of taking the process's memory.
"""

from __future__ import annotations

import ast
import math
import operator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .registry import Tool, ToolContext, ToolError

MAX_EXPRESSION_CHARS = 200  # in the schema too: the grammar holds a model's string to it
MAX_NODES = 200
MAX_RESULT_BITS = 4_000  # an integer result (or a power's) of at most ~1,200 digits
MAX_FACTORIAL = 500

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan,
              "asin": math.asin, "acos": math.acos, "atan": math.atan, "exp": math.exp,
              "log": math.log, "log10": math.log10, "log2": math.log2, "abs": abs,
              "round": round, "floor": math.floor, "ceil": math.ceil, "min": min, "max": max,
              "factorial": math.factorial}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _bits(value: Any) -> float:
    """An upper bound on the bits of a number's magnitude (floats are bounded by their type)."""
    return abs(value).bit_length() if isinstance(value, int) else 0


def _power(base: Any, exponent: Any) -> Any:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log2(abs(base)) > MAX_RESULT_BITS:
            raise ToolError("the power is too large to compute")
    if isinstance(exponent, int | float) and abs(exponent) > 10_000 and isinstance(base, int) \
            and abs(base) > 1:
        raise ToolError("the exponent is too large")
    result = base ** exponent
    if isinstance(result, complex):
        raise ToolError("the result is not a real number")
    return result


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        if isinstance(node.op, ast.Mult) and _bits(left) + _bits(right) > MAX_RESULT_BITS:
            raise ToolError("the product is too large to compute")
        return _BINARY[type(node.op)](left, right)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS and not node.keywords):
        args = [_evaluate(a) for a in node.args]
        if node.func.id == "factorial" and (len(args) != 1 or not isinstance(args[0], int)
                                            or not 0 <= args[0] <= MAX_FACTORIAL):
            raise ToolError(f"factorial takes a whole number from 0 to {MAX_FACTORIAL}")
        return _FUNCTIONS[node.func.id](*args)
    if isinstance(node, ast.Name):
        raise ToolError(f"unknown name {node.id!r} (known: {', '.join(sorted(_CONSTANTS))} and "
                        f"the functions {', '.join(sorted(_FUNCTIONS))})")
    raise ToolError(f"{type(node).__name__} is not arithmetic this calculator does")


def calculate(expression: str) -> str:
    """The value of an arithmetic ``expression``, as text; ToolError says what is wrong."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("expression must be a non-empty string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/").strip()
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError("the expression does not parse") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError("the expression is too complex")
    try:
        value = _evaluate(tree)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    except (ValueError, TypeError) as exc:
        raise ToolError(f"math error: {exc}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is too large (or not a number)")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def _calculator(arguments: dict[str, Any], context: ToolContext) -> str:
    return calculate(arguments.get("expression"))


def _current_time(arguments: dict[str, Any], context: ToolContext) -> str:
    name = arguments.get("timezone") or "UTC"
    if not isinstance(name, str) or len(name) > 64:
        raise ToolError("timezone must be an IANA name such as Europe/Paris")
    try:
        zone = UTC if name.upper() == "UTC" else ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown timezone {name!r}; use an IANA name such as Europe/Paris") from None
    now = datetime.now(zone)
    return f"{now.strftime('%A')} {now.isoformat(timespec='seconds')} ({name})"


SEARCH_RESULTS = 8


def _search_my_conversations(arguments: dict[str, Any], context: ToolContext) -> str:
    from ..search import MAX_QUERY_CHARS, search

    query = arguments.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ToolError("query must be a non-empty string")
    if len(query) > MAX_QUERY_CHARS:
        raise ToolError(f"query must be at most {MAX_QUERY_CHARS} characters")
    found, _ = search(context.db, context.owner, query, limit=SEARCH_RESULTS)
    found = [f for f in found if f["conversation_id"] != context.conversation_id]
    if not found:
        return "No conversations match."
    return "\n".join(f"- {f['title']} ({f['updated_at'][:10]}): {f['snippet']}" for f in found)


def _read_attachment(arguments: dict[str, Any], context: ToolContext) -> str:
    """A page or a range of lines of a file sent in this conversation, found by the name its
    ``<file name="…">`` block shows the model (the newest of that name)."""
    from ..attachments import files_of, read_passage
    from ..errors import AppError

    name = arguments.get("file")
    if not isinstance(name, str) or not name.strip():
        raise ToolError("file must be the name of a file sent in this conversation")
    page, first, last = (arguments.get(k) for k in ("page", "start_line", "end_line"))
    for key, value in (("page", page), ("start_line", first), ("end_line", last)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ToolError(f"{key} must be a whole number from 1")
    if context.conversation_id is None or context.db is None:
        raise ToolError("there are no files in this conversation")
    with context.db.read() as session:
        files = files_of(session, context.owner, context.conversation_id)
        matching = [f for f in files if f["filename"] == name.strip()]
        if not matching:
            names = ", ".join(sorted({f["filename"] for f in files})) or "none"
            raise ToolError(f"no file named {name.strip()!r} in this conversation (files: {names})")
        lines = None
        if first is not None or last is not None:
            lines = (first or 1, last or (first or 1) + 199)
        try:
            passage = read_passage(session, context.owner, matching[-1]["id"], page=page, lines=lines)
        except AppError as exc:  # a page a text file has not, lines out of order: the model reads why
            raise ToolError(exc.message) from exc
    where = (f"page {page} of {passage['pages']}" if page else "") + \
        (f"{', ' if page else ''}lines {lines[0]}-{lines[1]}" if lines else "")
    text = passage["text"] or "(nothing there: the page or lines are empty)"
    return f"{passage['filename']}{f' ({where})' if where else ''}:\n{text}"


BUILTINS = [
    Tool("calculator", "Evaluate an arithmetic expression exactly: + - * / // % ** (or ^), "
         "parentheses, sqrt, sin, cos, tan, log, exp, abs, round, floor, ceil, min, max, "
         "factorial, pi, e.",
         {"type": "object", "properties": {"expression": {
             # Arithmetic's characters only: the grammar then holds a small model to them
             # (no quote or brace inside the string, so it ends where the expression does).
             "type": "string", "pattern": f"^[-0-9a-z+*/%^()., ]{{1,{MAX_EXPRESSION_CHARS}}}$",
             "description": "e.g. (2+3)*4^2"}},
          "required": ["expression"]},
         _calculator, timeout=5.0, max_result_chars=2_000, title="Calculator"),
    Tool("current_time", "The current date and time, in a timezone (default UTC).",
         {"type": "object", "properties": {"timezone": {
             "type": "string", "maxLength": 64,
             "description": "an IANA timezone such as Europe/Paris"}}},
         _current_time, timeout=5.0, max_result_chars=200, title="Current time"),
    Tool("search_my_conversations", "Search this visitor's own earlier conversations by words; "
         "returns titles, dates and the text around each match.",
         {"type": "object", "properties": {"query": {"type": "string", "maxLength": 200}},
          "required": ["query"]},
         _search_my_conversations, timeout=10.0, max_result_chars=4_000,
         title="Search my conversations"),
    Tool("read_attachment", "Read a file sent in this conversation: a page of a PDF, or a range "
         "of lines (the whole text when neither is given; long texts are cut).",
         {"type": "object", "properties": {
             "file": {"type": "string", "maxLength": 255, "description": "the file's name"},
             "page": {"type": "integer", "minimum": 1},
             "start_line": {"type": "integer", "minimum": 1},
             "end_line": {"type": "integer", "minimum": 1}},
          "required": ["file"]},
         _read_attachment, timeout=10.0, max_result_chars=8_000, title="Read an attached file"),
]
