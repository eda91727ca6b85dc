"""The one options spec: every generation option a client may send, its default, its range and
its JSON schema, written once in ``OPTIONS``. From it come the parsing of the socket's
``options``, of ``/v1`` bodies and of conversation settings (``GenerationOptions.parse``,
``clean_settings``), the OpenAPI schemas (openapi.py), and the page's defaults and ranges
(``page_options``, the root element's ``data-options``).

A range bound or default given as a string names a config setting (``MAX_TOKENS_LIMIT``…), read
from the app's config, or from config.py's defaults where there is none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import SETTINGS
from .errors import Invalid
from .models import ENGINES
from .validation import MAX_SAFE_INTEGER

CONFIG_DEFAULTS = {name: spec[0] for name, spec in SETTINGS.items()}
SEED_LIMIT = 2**32  # llama.cpp samplers take a uint32 seed
TOP_LOGPROBS = 20  # the most alternatives a token's logprobs list, as OpenAI
LOGIT_BIAS_ENTRIES = 300  # as OpenAI: a map is checked, copied and sent to each sampler
MAX_CHAT_TOOLS = 64  # as engines/structured.py's MAX_TOOLS
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TYPES = ["object", "string", "integer", "number", "boolean", "null"]


@dataclass(frozen=True)
class Option:
    """One option. ``kind``: number, integer, text, or the name of a check in
    engines/structured.py (stop, response_format, tools). ``where``: the parsers that take it:
    ``options`` (the socket's), ``settings`` (conversation settings and visitor defaults),
    ``v1`` (OpenAI request bodies). ``page``: offered on the page, with ``step``."""

    kind: str
    default: Any = None
    min: Any = None
    max: Any = None
    step: float | None = None
    where: tuple[str, ...] = ("options", "settings", "v1")
    page: bool = False
    schema: dict[str, Any] = field(default_factory=dict)  # kinds without a range
    example: Any = None
    # Fields the option is only valid beside, as its example needs them (published as
    # x-requires: OpenAI refuses top_logprobs without logprobs: true).
    requires: dict[str, Any] = field(default_factory=dict)


# response_format as published: the three types OpenAI has, the schema a small subset (what
# the fuzzer sends); any JSON schema within the README's Security limits is accepted.
_FORMATS = [
    {"type": "object", "additionalProperties": False, "required": ["type"],
     "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}}},
    {"type": "object", "additionalProperties": False, "required": ["type", "json_schema"],
     "properties": {
         "type": {"type": "string", "enum": ["json_schema"]},
         "json_schema": {"type": "object", "additionalProperties": False, "required": ["schema"],
                         "properties": {
                             "name": {"type": "string", "maxLength": 64},
                             "strict": {"type": "boolean"},
                             "schema": {"type": "object", "additionalProperties": False,
                                        "required": ["type"],
                                        "properties": {"type": {"type": "string", "enum": _TYPES}},
                                        "description": "a JSON schema (this is the fuzzed "
                                                       "subset)"}}}}},
]
_PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}
_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}

OPTIONS: dict[str, Option] = {
    "system": Option("text", max="MAX_MESSAGE_CHARS", where=("options", "settings"), page=True,
                     example="Be brief."),
    "temperature": Option("number", 0.7, 0.0, 2.0, 0.1, page=True, example=0.2),
    "top_p": Option("number", 0.95, 0.0, 1.0, 0.05, page=True, example=0.9),
    "max_tokens": Option("integer", "MAX_TOKENS", 1, "MAX_TOKENS_LIMIT", 1, page=True, example=8),
    "seed": Option("integer", None, 0, SEED_LIMIT - 1, 1, page=True, example=7),
    "stop": Option("stop", example=["\n\n"]),
    "presence_penalty": Option("number", 0.0, -2.0, 2.0, example=0.5),
    "frequency_penalty": Option("number", 0.0, -2.0, 2.0, example=0.5),
    "response_format": Option("response_format", schema={"anyOf": _FORMATS}, example=_PERSON),
    "tools": Option("tools", where=("v1",), schema={
        "type": "array", "items": {"type": "object", "required": ["type", "function"]}},
        example=[_TOOL]),
    "tool_choice": Option("tool_choice", where=("v1",), schema={"anyOf": [
        {"type": "string", "enum": ["auto", "none", "required"]},
        {"type": "object", "required": ["type", "function"]}]}, example="auto"),
    # Token id (a decimal string) → bias added to its logit; -100 bans it. The ids are checked
    # against the model's vocabulary by the engine that runs it, before any sampling.
    "logit_bias": Option("logit_bias", where=("v1",), schema={
        "type": "object", "maxProperties": LOGIT_BIAS_ENTRIES,
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
        example={"15": -100}),
    "logprobs": Option("boolean", where=("v1",), schema={"type": "boolean"}, example=True),
    "top_logprobs": Option("integer", None, 0, TOP_LOGPROBS, 1, where=("v1",), example=2,
                           requires={"logprobs": True}),
}
# Settings that are not generation options: which model writes a conversation's replies, where.
SETTINGS_ONLY: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "minLength": 1, "maxLength": 200, "example": "tiny-chat"},
    "engine": {"type": "string", "enum": list(ENGINES), "example": "server"},
    # The tools a conversation's model may call (GET /api/tools names them; none: tools off),
    # and whether it must call one before it answers ("required") or may ("auto").
    "chat_tools": {"type": "array", "maxItems": MAX_CHAT_TOOLS,
                   "items": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                   "example": ["calculator"]},
    "chat_tool_choice": {"type": "string", "enum": ["auto", "required"], "example": "auto"},
}


def names(where: str) -> tuple[str, ...]:
    """The fields a parser takes: ``options``, ``settings`` or ``v1`` (OpenAI bodies)."""
    found = tuple(n for n, o in OPTIONS.items() if where in o.where)
    return found + tuple(SETTINGS_ONLY) if where == "settings" else found


def _value(value: Any, config: Mapping[str, Any]) -> Any:
    return config.get(value, CONFIG_DEFAULTS[value]) if isinstance(value, str) else value


def option_schema(name: str, config: Mapping[str, Any] = CONFIG_DEFAULTS) -> dict[str, Any]:
    """One option's JSON schema (OpenAPI 3.0), bounds as ``config`` has them."""
    option = OPTIONS[name]
    schema: dict[str, Any]
    if option.kind in ("number", "integer"):
        schema = {"type": option.kind, "minimum": _value(option.min, config),
                  "maximum": _value(option.max, config)}
    elif option.kind == "text":
        schema = {"type": "string", "maxLength": _value(option.max, config)}
    elif option.kind == "stop":
        from .engines.structured import MAX_STOP_CHARS, MAX_STOP_STRINGS  # as in parse()

        item = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
        schema = {"anyOf": [item, {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": item}]}
    else:
        schema = dict(option.schema)
    extra = {"x-requires": option.requires} if option.requires else {}
    return {**schema, "nullable": True, "example": option.example, **extra}


def page_options(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"default", "min", "max", "step"}}`` for the settings the page offers
    (``system``: ``{"default", "max_length"}``)."""
    offered: dict[str, dict[str, Any]] = {}
    for name, option in OPTIONS.items():
        if option.page and option.kind == "text":
            offered[name] = {"default": option.default, "max_length": _value(option.max, config)}
        elif option.page:
            offered[name] = {"default": _value(option.default, config), "min": option.min,
                             "max": _value(option.max, config), "step": option.step}
    return offered


@dataclass(frozen=True)
class GenerationOptions:
    """How to write one reply: what the socket, the worker and the API hand an engine.

    ``response_format``, ``tools`` and ``tool_choice`` are kept as OpenAI spells them (an
    upstream gets them as given); ``grammar`` is the GBNF the embedded engines enforce for
    them, built (and so checked) when the options are parsed, with tool calls in bchat's own
    format (a model whose template writes them otherwise gets its own: structured.model_grammar)."""

    system: str | None = None
    temperature: float = OPTIONS["temperature"].default
    top_p: float = OPTIONS["top_p"].default
    max_tokens: int = CONFIG_DEFAULTS["MAX_TOKENS"]
    seed: int | None = None  # /v1's any int64 (openai_dialect.py); the socket's a uint32
    stop: tuple[str, ...] = ()
    presence_penalty: float = OPTIONS["presence_penalty"].default
    frequency_penalty: float = OPTIONS["frequency_penalty"].default
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = field(default=None, compare=False)
    tool_choice: Any = None
    logit_bias: dict[str, float] | None = None  # {"id": bias}, ids as decimal strings (JSON keys)
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token (logprobs only)
    grammar: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, raw: Any, config: Mapping[str, Any] = CONFIG_DEFAULTS, *,
              allow_tools: bool = False) -> GenerationOptions:
        """Validated options from a client's dict; ``Invalid("bad_options")`` on any bad value,
        with ``param`` naming it. ``allow_tools``: OpenAI bodies (tools, tool_choice)."""
        # Imported here, not above: the engines import this module.
        from .engines import structured

        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise Invalid("bad_options", "options must be an object")
        unknown = set(raw) - set(names("options") + (names("v1") if allow_tools else ()))
        if unknown:
            raise Invalid("bad_options", f"unknown options: {', '.join(sorted(map(str, unknown)))}"[:300])
        values: dict[str, Any] = {}
        for name, option in OPTIONS.items():
            value = raw.get(name)
            if option.kind in ("number", "integer") and value is not None:
                low, high = option.min, _value(option.max, config)
                integer = option.kind == "integer"
                ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
                # "low <= value <= high" is False for NaN, so NaN is refused here too.
                if isinstance(value, bool) or not ok_type or not (low <= value <= high):
                    kind = "an integer" if integer else "a number"
                    raise Invalid("bad_options", f"{name} must be {kind} from {low} to {high}",
                                  param=name)
                values[name] = value if integer else float(value)
            elif option.kind in ("number", "integer") and option.default is not None:
                values[name] = _value(option.default, config)
        logprobs = raw.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise Invalid("bad_options", "logprobs must be true or false", param="logprobs")
        # As OpenAI and llama-server: top_logprobs alone is a mistake, not a request.
        if values.get("top_logprobs") is not None and logprobs is not True:
            raise Invalid("bad_options", "top_logprobs needs logprobs: true", param="top_logprobs")
        system = raw.get("system")
        if system is not None and (not isinstance(system, str) or
                                   len(system) > _value(OPTIONS["system"].max, config)):
            raise Invalid("bad_options", "system must be a string within the message limit",
                          param="system")
        def checked(param: str, check, *args):
            try:
                return check(*args)
            except structured.SchemaError as exc:
                raise Invalid("bad_options", str(exc), param=param) from None

        stop = checked("stop", structured.check_stop, raw.get("stop"))
        response_format = checked("response_format", structured.check_response_format,
                                  raw.get("response_format"))
        tools, tool_choice = checked("tools", structured.check_tools, raw.get("tools"),
                                     raw.get("tool_choice"))
        grammar = checked("response_format" if response_format else "tools",
                          structured.build_grammar, response_format, tools, tool_choice)
        return cls(system=system or None, stop=stop, response_format=response_format,
                   tools=tools, tool_choice=tool_choice, grammar=grammar,
                   logit_bias=check_logit_bias(raw.get("logit_bias")), logprobs=bool(logprobs),
                   **values)

    @property
    def sampler_seed(self) -> int | None:
        """The seed as llama.cpp takes it, a uint32 other than 0xFFFFFFFF (which llama.cpp
        reads as "a random seed"): the seed modulo 2**32 - 1, so the same seed, negative or
        past 2**32, always gives the same reply."""
        return None if self.seed is None else self.seed % (SEED_LIMIT - 1)

    def to_dict(self) -> dict[str, Any]:
        """What a reply's provenance records (compact: a schema's name, the tools' names)."""
        # The options the page offers are always recorded; the others when they are set.
        data: dict[str, Any] = {name: getattr(self, name) for name, option in OPTIONS.items()
                                if option.page}
        if self.seed is not None and abs(self.seed) >= MAX_SAFE_INTEGER:
            data["seed"] = str(self.seed)  # an int64 a browser, or an import, could not read
        if self.stop:
            data["stop"] = list(self.stop)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        if self.response_format:
            data["response_format"] = {"type": self.response_format["type"]}
            name = (self.response_format.get("json_schema") or {}).get("name")
            if isinstance(name, str):
                data["response_format"]["name"] = name[:100]
        if self.tools:
            data["tools"] = [t["function"]["name"] for t in self.tools]
            data["tool_choice"] = self.tool_choice
        if self.logit_bias:  # it shaped the reply as much as the temperature did
            data["logit_bias"] = dict(self.logit_bias)
        if self.logprobs:
            data["logprobs"], data["top_logprobs"] = True, self.top_logprobs
        return data


def check_logit_bias(raw: Any) -> dict[str, float] | None:
    """OpenAI's ``logit_bias``: token ids (decimal strings) to numbers from -100 to 100, at
    most LOGIT_BIAS_ENTRIES of them; the ids come back in one spelling ("007" is "7")."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict) or len(raw) > LOGIT_BIAS_ENTRIES:
        raise Invalid("bad_options", f"logit_bias must map at most {LOGIT_BIAS_ENTRIES} token "
                      "ids to numbers", param="logit_bias")
    clean: dict[str, float] = {}
    for key, bias in raw.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise Invalid("bad_options", f"logit_bias: {str(key)[:20]!r} is not a token id",
                          param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise Invalid("bad_options", "logit_bias values must be numbers from -100 to 100",
                          param="logit_bias")
        clean[str(int(key))] = float(bias)
    return clean


def settings_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The generation options stored in conversation settings (not model or engine)."""
    return {k: settings[k] for k in names("options") if settings.get(k) is not None}


def clean_settings(raw: Any, config: Mapping[str, Any] = CONFIG_DEFAULTS) -> dict[str, Any]:
    """Validated conversation settings (or visitor defaults); a null value removes a setting."""
    if not isinstance(raw, dict):
        raise Invalid("bad_settings", "settings must be an object")
    unknown = set(raw) - set(names("settings"))
    if unknown:
        raise Invalid("bad_settings", f"unknown settings: {', '.join(sorted(map(str, unknown)))[:200]}")
    try:
        GenerationOptions.parse(settings_options(raw), config)
    except Invalid as exc:
        raise Invalid("bad_settings", exc.message) from None
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 200):
        raise Invalid("bad_settings", "model must be a model id")
    engine = raw.get("engine")
    if engine is not None and engine not in ENGINES:
        raise Invalid("bad_settings", f"engine must be one of {', '.join(ENGINES)}")
    tools = raw.get("chat_tools")
    if tools is not None and (not isinstance(tools, list) or len(tools) > MAX_CHAT_TOOLS or not all(
            isinstance(t, str) and _TOOL_NAME.fullmatch(t) for t in tools)):
        raise Invalid("bad_settings", f"chat_tools must be a list of at most {MAX_CHAT_TOOLS} "
                      "tool names (GET /api/tools)")
    choice = raw.get("chat_tool_choice")
    if choice is not None and choice not in ("auto", "required"):
        raise Invalid("bad_settings", 'chat_tool_choice must be "auto" or "required"')
    return dict(raw)
