"""The JSON API as an OpenAPI 3.0 document, served at ``/api/openapi.json``.

The paths are written by hand, next to the views they describe: ``tests/test_openapi.py`` fails
when a route of ``api.bp`` is missing here, and schemathesis checks the app against it (no 5xx,
documented status codes and shapes). The option schemas (``Settings``, the socket's
``Options``, ``ChatCompletionRequest`` of ``/v1``) are generated from options.py and
openai_dialect.py, with the limits of the app's config. The websocket is described in
docs/protocol.md, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .models import STATUSES
from .openai_dialect import REQUEST_FIELDS
from .options import CONFIG_DEFAULTS, SETTINGS_ONLY, names, option_schema
from .paging import CURSOR_PATTERN

_ID = {"type": "string", "minLength": 1, "maxLength": 64}
_TIME = {"type": "string", "format": "date-time"}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 9007199254740991, "nullable": True}
# Request bodies say exactly what the app accepts (schemathesis checks that valid data is
# accepted): numbers within ±2**53 (webapp/validation.py), text with something besides
# spaces, times as the API writes them, meta values as flat scalars.
_SPEED = {"type": "number", "minimum": 0, "maximum": 9007199254740991, "nullable": True}
# Python's str.strip() also strips \x1c-\x1f, which a regex \S counts as visible.
_VISIBLE = r"[^\s\x1c-\x1f]"
_TEXT = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": _VISIBLE}
_TIME_IN = {
    "type": "string", "nullable": True,
    "pattern": r"^(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
               r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?Z$",
}
_META_IN = {
    "type": "object", "nullable": True,
    "additionalProperties": {"nullable": True, "anyOf": [
        {"type": "string"}, {"type": "boolean"},
        {"type": "number", "minimum": -9007199254740991, "maximum": 9007199254740991},
    ]},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "the input breaks a rule; error.code says which"),
    "401": _json(_ref("Error"), "BCHAT_PASSCODE is set and was not entered"),
    "404": _json(_ref("Error"), "no such conversation (or it belongs to someone else)"),
    "405": _json(_ref("Error"), "method not allowed"),
    "413": _json(_ref("Error"), "the body is over BCHAT_MAX_UPLOAD_BYTES"),
    "415": _json(_ref("Error"), "a write without a JSON body"),
}


def _op(operation_id: str, summary: str, ok: str, schema: dict[str, Any] | None,
        description: str, body: dict[str, Any] | None = None, *,
        also: dict[str, str] | None = None, **more: Any) -> dict[str, Any]:
    """One operation: its answer ``ok`` (``schema`` None: no content), the errors any
    operation may answer and those in ``also``, and ``body`` its JSON request body."""
    responses: dict[str, Any] = {**_ERRORS, **{s: {"description": d} for s, d in (also or {}).items()}}
    responses[ok] = {"description": description} if schema is None else _json(schema, description)
    operation = {"operationId": operation_id, "summary": summary, "responses": responses, **more}
    if body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": body}}}
    return operation


def _object(properties: dict[str, Any], *required: str, **more: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties,
            **({"required": list(required)} if required else {}), **more}


def _closed(properties: dict[str, Any], *required: str, **more: Any) -> dict[str, Any]:
    """A request body's object: these properties, no others."""
    return _object(properties, *required, additionalProperties=False, **more)


def _listing(key: str, items: dict[str, Any]) -> dict[str, Any]:
    """An answer ``{key: [items]}``."""
    return _object({key: {"type": "array", "items": items}}, key)


def _page(key: str, items: dict[str, Any]) -> dict[str, Any]:
    """A keyset page ``{key: [items], next}`` (webapp/paging.py)."""
    return _object({key: {"type": "array", "items": items},
                    "next": {"type": "string", "nullable": True,
                             "description": "pass as cursor for the following page; null on "
                                            "the last (and without limit)"}}, key, "next")


_PAGING = [
    {"name": "limit", "in": "query", "required": False,
     "description": "at most this many, newest first, with next for the following page",
     "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
    {"name": "cursor", "in": "query", "required": False,
     "description": "the next value of the page before (opaque); pages neither repeat nor skip "
                    "a conversation when others are added meanwhile",
     "schema": {"type": "string", "pattern": CURSOR_PATTERN}},
]


# A window of a long conversation's current branch (chats.ChatService._window).
_WINDOW_LIMIT = {"name": "limit", "in": "query", "required": False,
                 "description": "a window: the current branch's last limit messages (with "
                                "earlier for the page above), each with its siblings; without "
                                "limit or before, every message of the tree",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 200}}
_WINDOW = [_WINDOW_LIMIT,
           {"name": "before", "in": "query", "required": False,
            "description": "the page above: the limit (default 200) messages of the branch "
                           "above this message (a window's earlier value)",
            "schema": _ID}]


def _in_path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _ID}


_CONVERSATION_ID = _in_path("conversation_id")
_STATUS = {"type": "string", "enum": list(STATUSES)}
# How a reply was made, as a page posts it or an import brings it (models.Provenance).
_REPLY_FACTS_IN = {
    "backend": {"type": "string", "maxLength": 200, "nullable": True},
    "model": {"type": "string", "maxLength": 200, "nullable": True},
    "tokens_per_second": _SPEED,
    "finish_reason": {"type": "string", "maxLength": 200, "nullable": True},
    "meta": _META_IN,
}
_SETTINGS_OUT = _object({"settings": {"type": "object"}}, "settings")

# A benchmark's figures: measured values, bounded so a typo cannot pose as a result.
_FIGURE = {"type": "number", "minimum": 0, "maximum": 10_000_000, "nullable": True}
_TALLY = {"type": "integer", "minimum": 0, "maximum": 10_000_000, "nullable": True}

SCHEMAS: dict[str, Any] = {
    "Error": _object({"error": _object({"code": {"type": "string"}, "message": {"type": "string"}},
                                       "code", "message")}, "error"),
    "Conversation": _object({
        "id": _ID, "title": {"type": "string"}, "created_at": _TIME, "updated_at": _TIME,
        "shared": {"type": "boolean"},
        "settings": {"type": "object"},
        "current_message_id": {**_ID, "nullable": True},
        "source": {"type": "string", "enum": ["chat", "api"],
                   "description": "api: stored by a /v1 call made with an API key"},
        "messages": {"type": "array", "items": _ref("Message")},
        "earlier": {**_ID, "nullable": True,
                    "description": "a window only: pass as before for the messages above it; "
                                   "null once it reaches the first message"},
    }, "id", "title", "created_at", "updated_at"),
    "ApiKey": _object({
        "id": _ID, "name": {"type": "string"},
        "prefix": {"type": "string", "description": "the token's first characters"},
        "created_at": _TIME,
        "last_used_at": {**_TIME, "nullable": True},
        "revoked": {"type": "boolean"},
        "revoked_at": {**_TIME, "nullable": True},
    }, "id", "name", "prefix", "created_at", "revoked"),
    "Message": _object({
        "id": _ID,
        "parent_id": {**_ID, "nullable": True},
        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
        "content": {"type": "string"},
        "status": _STATUS,
        "created_at": _TIME,
        "engine": {"type": "string", "enum": ["server", "browser"], "nullable": True},
        "backend": {"type": "string", "nullable": True},
        "model": {"type": "string", "nullable": True},
        "usage": _object({"prompt_tokens": _COUNT, "completion_tokens": _COUNT}),
        "tokens_per_second": {"type": "number", "minimum": 0, "nullable": True},
        "finish_reason": {"type": "string", "nullable": True},
        "meta": {"type": "object"},
        "attachments": {"type": "array", "items": _ref("Attachment"),
                        "description": "a user message's files (absent when it has none)"},
    }, "id", "role", "content", "status", "created_at"),
    "Attachment": _object({
        "id": _ID, "filename": {"type": "string"}, "mime": {"type": "string"},
        "size": {"type": "integer", "minimum": 0, "description": "the uploaded file's bytes"},
        "sha256": {"type": "string"},
        "tokens": {"type": "integer", "minimum": 0,
                   "description": "its extracted text's tokens, estimated (3 characters a token)"},
        "chars": {"type": "integer", "minimum": 0},
        "pages": {"type": "integer", "nullable": True, "description": "a PDF's pages"},
        "width": {"type": "integer", "minimum": 1,
                  "description": "an image's pixels across (absent for other files)"},
        "height": {"type": "integer", "minimum": 1, "description": "an image's pixels down"},
    }, "id", "filename", "mime", "size", "sha256", "tokens"),
    "Provenance": _closed({"engine": {"type": "string", "enum": ["browser"]}, **_REPLY_FACTS_IN,
                           "prompt_tokens": _COUNT, "completion_tokens": _COUNT}),
    "NewMessage": _closed({
        "role": {"type": "string", "enum": ["user", "assistant"]},
        "content": {"type": "string", "maxLength": 32000, "pattern": _VISIBLE},
        "status": _STATUS,
        "provenance": _ref("Provenance"),
        "parent_id": {**_ID, "nullable": True,
                      "description": "absent: after the current leaf; null: a new root"},
        "attachments": {"type": "array", "maxItems": 10, "items": _ID,
                        "description": "a user message's files: ids from POST /api/attachments"},
    }, "role", "content"),
    "ImportMessage": _closed({
        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
        "content": {"type": "string", "maxLength": 32000},
        "status": _STATUS,
        "created_at": _TIME_IN,
        "engine": {"type": "string", "enum": ["server", "browser"], "nullable": True},
        **_REPLY_FACTS_IN,
        "usage": _closed({"prompt_tokens": _COUNT, "completion_tokens": _COUNT}, nullable=True),
    }, "role", "content"),
    "Import": _closed({
        "format": {"type": "string", "enum": ["bchat.conversation"]},
        "version": {"type": "integer", "enum": [1]},
        "exported_at": {"type": "string"},
        "conversation": _closed({"title": _TEXT, "created_at": _TIME_IN,
                                 "updated_at": {"type": "string"}}, "title"),
        "messages": {"type": "array", "maxItems": 50, "items": _ref("ImportMessage")},
    }, "format", "version", "conversation", "messages",
        description="a version 1 export (the fuzzed subset); version 2 exports, with message "
                    "ids, parent ids, settings and current_message_id, and version 3, with "
                    "user messages' attachments (their text included), import too"),
    "Share": _object({
        "id": _ID,
        "url": {"type": "string", "nullable": True},
        "title": {"type": "string"},
        "conversation_id": _ID,
        "conversation_exists": {"type": "boolean"},
        "messages": {"type": "integer", "minimum": 0},
        "created_at": _TIME,
        "updated_at": _TIME,
    }, "id", "url", "title", "conversation_id", "messages"),
    "Export": _object({
        "format": {"type": "string", "enum": ["bchat.conversation"]},
        "version": {"type": "integer", "enum": [3]},
        "exported_at": _TIME,
        "conversation": _object({"title": {"type": "string", "minLength": 1, "maxLength": 200},
                                 "created_at": {**_TIME, "nullable": True},
                                 "updated_at": {**_TIME, "nullable": True}}, "title"),
        "messages": {"type": "array", "items": _ref("Message")},
    }, "format", "version", "conversation", "messages"),
}

PATHS: dict[str, Any] = {
    "/healthz": {"get": _op(
        "healthz", "the database answers; how many models; 503 naming a dead or stuck model",
        "200", _object({"status": {"type": "string"}, "models": {"type": "integer"},
                        "runs": {"type": "integer"}}, "status", "models"), "healthy",
        also={"503": "an inference thread is dead or stuck"})},
    "/api/openapi.json": {"get": _op("openapi", "this document", "200", {"type": "object"},
                                     "the OpenAPI document")},
    "/api/models": {"get": _op(
        "models", "every model, where it runs, and its facts",
        "200", _object({"models": {"type": "array", "items": {"type": "object"}},
                        "default": {"type": "string", "nullable": True}}, "models"), "the models")},
    "/api/tools": {"get": _op(
        "tools", "the tools a conversation may enable (its chat_tools setting): built-ins and "
        "the admin's MCP servers' tools",
        "200", _object({"tools": {"type": "array", "items": {"type": "object"}},
                        "servers": {"type": "array", "items": {"type": "object"}},
                        "max_steps": {"type": "integer"}}, "tools"), "the tools")},
    "/api/models/quality": {"get": _op(
        "model_quality", "model families: each variant's size, bpw, and measured quality and speed",
        "200", _listing("families", _object({
            "family": {"type": "string"}, "parameters": {"type": "integer"},
            "active_parameters": {"type": "integer"},
            "experts": {"type": "integer", "nullable": True},
            "experts_used": {"type": "integer", "nullable": True},
            "members": {"type": "array", "items": _object({
                "model": {"type": "string"}, "quantization": {"type": "string"},
                "bits_per_weight": {"type": "number"}, "file_size": {"type": "integer"},
                "quality": {"type": "object", "nullable": True,
                            "description": "ppl, delta_ppl, delta_ppl_pct, kld, top1, prompt_tps, "
                                           "decode_tps, stale; null until `bchat models eval`"}},
                "model", "quantization", "bits_per_weight", "file_size", "quality")},
            "evaluation": {"type": "object", "nullable": True}}, "family", "members")),
        "the families, highest-precision member first (the reference of `bchat models eval`)")},
    "/api/conversations": {
        "get": _op("list_conversations", "your conversations, newest first",
                   "200", _page("conversations", _ref("Conversation")),
                   "the list: a page with limit, else all of it", parameters=_PAGING),
        "post": _op("create_conversation", "a new, empty conversation",
                    "201", _ref("Conversation"), "created", _closed({"title": _TEXT})),
    },
    "/api/conversations/import": {"post": _op(
        "import_conversation", "an export file back into a new conversation",
        "201", _ref("Conversation"), "imported", _ref("Import"))},
    "/api/conversations/{conversation_id}": {
        "parameters": [_CONVERSATION_ID],
        "get": _op("get_conversation", "a conversation with its messages, or a window of them",
                   "200", _ref("Conversation"), "the conversation", parameters=_WINDOW),
        "patch": _op("update_conversation",
                     "rename, switch branch (to the newest leaf below a message), change settings",
                     "200", _ref("Conversation"), "changed; a switch answers with the new "
                     "branch (a window of it with limit, else the whole tree)",
                     _closed({"title": _TEXT, "current_message_id": _ID,
                              "settings": _ref("Settings")}, minProperties=1),
                     parameters=[_WINDOW_LIMIT]),
        "delete": _op("delete_conversation", "delete, with its messages", "204", None, "deleted"),
    },
    "/api/benchmarks": {
        "get": _op("list_benchmarks",
                   "everyone's runs of the fixed prompt set, newest first, and the prompt set",
                   "200", _object({"benchmarks": {"type": "array"}, "prompts": {"type": "array"},
                                   "tokens": {"type": "integer"}, "seed": {"type": "integer"}},
                                  "benchmarks", "prompts"), "the runs"),
        "post": _op("add_benchmark", "store a run made in the page (browser engine)",
                    "201", {"type": "object"}, "stored", _closed({
                        "backend": {"type": "string", "enum": ["webgpu", "wasm-mt", "wasm-st"]},
                        "model": {"type": "string", "minLength": 1, "maxLength": 200},
                        "device": _closed({
                            "cores": {"type": "integer", "minimum": 1, "maximum": 1024},
                            "device_memory": {"type": "number", "minimum": 0, "maximum": 1024},
                            "gpu": {"type": "string", "maxLength": 80, "nullable": True},
                            "browser": {"type": "string", "maxLength": 80, "nullable": True},
                            "os": {"type": "string", "maxLength": 80, "nullable": True}}),
                        "results": {"type": "array", "minItems": 1, "maxItems": 2, "items": _closed({
                            "prompt": {"type": "string", "enum": ["short", "long"]},
                            "prompt_tokens": _TALLY, "prompt_cached": _TALLY,
                            "completion_tokens": _TALLY, "prompt_ms": _FIGURE,
                            "prompt_tps": _FIGURE, "decode_tps": _FIGURE, "ttft_ms": _FIGURE,
                            "cold": {"type": "boolean"}}, "prompt")},
                    }, "backend", "model", "results"),
                    also={"429": "too many posts from this visitor or address "
                                 "(BCHAT_BENCHMARK_RATE_LIMIT); see Retry-After"}),
    },
    "/api/benchmarks/server": {"post": _op(
        "run_server_benchmark", "run the prompt set on a server model now",
        "201", {"type": "object"}, "the run, stored",
        _closed({"model": {"type": "string", "minLength": 1, "maxLength": 200},
                 "tokens": {"type": "integer", "minimum": 1, "maximum": 8},
                 "run": {"type": "string", "minLength": 1, "maxLength": 64}}),
        also={"409": "another server benchmark is running, or this one was cancelled",
              "429": "rate-limited"}),
        "delete": _op("cancel_server_benchmark", "stop the caller's server benchmark",
                      "204", None, "stopped: its POST answers 409 cancelled",
                      parameters=[{"name": "run", "in": "query", "required": False,
                                   "schema": {"type": "string", "minLength": 1, "maxLength": 64},
                                   "description": "the run name its POST gave (stops it even "
                                                  "before it begins)"}])},
    "/api/defaults": {
        "get": _op("get_defaults", "the settings a new conversation starts from",
                   "200", _SETTINGS_OUT, "the visitor's defaults"),
        "put": _op("put_defaults", "change the visitor's defaults", "200", _SETTINGS_OUT, "stored",
                   _closed({"settings": _ref("Settings")}, "settings")),
    },
    "/api/conversations/{conversation_id}/messages": {
        "parameters": [_CONVERSATION_ID],
        "post": _op("add_message", "store a message written in the page (browser engine)",
                    "201", _ref("Message"), "stored", _ref("NewMessage"),
                    also={"409": "already_sent: a file of attachments was sent in another "
                                 "conversation"}),
    },
    "/api/conversations/{conversation_id}/messages/{message_id}": {
        "parameters": [_CONVERSATION_ID, _in_path("message_id")],
        "patch": _op("update_message", "grow or settle a reply the page is writing (browser engine)",
                     "200", _ref("Message"), "updated",
                     _closed({"content": {"type": "string", "maxLength": 32000},
                              "status": _STATUS, "provenance": _ref("Provenance")}, "content"),
                     also={"409": "the reply is already final"}),
    },
    "/api/conversations/{conversation_id}/tool-setup": {
        "parameters": [_CONVERSATION_ID],
        "get": _op(
            "tool_setup", "what the page's next reply is told and held to (browser engine, tools on)",
            "200", _object({
                "tools": {"type": "array", "items": {"type": "string"},
                          "description": "the tools on (none: the reply is plain text)"},
                "tool_choice": {"type": "string", "nullable": True,
                                "enum": ["auto", "required", "none", None]},
                "instructions": {"type": "string", "description": "for the system prompt"},
                "grammar": {"type": "string", "nullable": True,
                            "description": "GBNF the reply is held to (wllama's grammar)"},
                "steps": {"type": "integer", "minimum": 0},
                "max_steps": {"type": "integer", "minimum": 0},
                "call_opening": {"type": "string",
                                 "description": "how a reply that is a call starts"}},
                "tools", "tool_choice", "instructions", "grammar", "steps", "max_steps",
                "call_opening"), "the setup",
            parameters=[{"name": "parent", "in": "query", "required": False, "schema": _ID,
                         "description": "the message the reply goes under (none: a turn's "
                                        "first reply)"}]),
    },
    "/api/conversations/{conversation_id}/messages/{message_id}/tool-step": {
        "parameters": [_CONVERSATION_ID, _in_path("message_id")],
        "post": _op(
            "tool_step", "run and store the tool calls of a reply the page is writing (browser "
            "engine)", "200", _object({
                "type": {"type": "string", "enum": ["step"]}, "message_id": _ID,
                "message": _ref("Message"),
                "tool_messages": {"type": "array", "items": _ref("Message")},
                "reply": _ref("Message"),
                "tool_frames": {"type": "array", "items": {"type": "object"}},
                "next": {"type": "object", "description": "as tool-setup answers, for the "
                                                          "next reply"}},
                "type", "message_id", "message", "tool_messages", "reply", "tool_frames", "next"),
            "the step is stored",
            _closed({"content": {"type": "string", "minLength": 1, "maxLength": 32000,
                                 "pattern": _VISIBLE},
                     "provenance": _ref("Provenance")}, "content"),
            also={"409": "the reply is already final"}),
    },
    "/api/conversations/{conversation_id}/share": {
        "parameters": [_CONVERSATION_ID],
        "post": _op("share_conversation", "create or refresh the share link", "200", _ref("Share"),
                    "the link", _closed({"new_link": {"type": "boolean"}})),
        "delete": _op("revoke_share", "revoke the link", "204", None, "revoked"),
    },
    "/api/conversations/{conversation_id}/export": {
        "parameters": [_CONVERSATION_ID],
        "get": {
            "operationId": "export_conversation", "summary": "download as JSON or Markdown",
            "parameters": [{"name": "format", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["json", "md", "markdown"]}}],
            "responses": {
                **_ERRORS,
                "200": {"description": "the file", "content": {
                    "application/json": {"schema": _ref("Export")},
                    "text/markdown": {"schema": {"type": "string"}},
                }},
            },
        },
    },
    "/api/shares": {"get": _op("list_shares", "your share links",
                               "200", _listing("shares", _ref("Share")), "the links")},
    "/api/search": {"get": _op(
        "search_conversations", "your conversations whose title or messages hold every word of q",
        "200", _page("results", _object({
            "conversation_id": _ID, "title": {"type": "string"}, "updated_at": _TIME,
            "message_id": {**_ID, "nullable": True},
            "snippet": {"type": "string", "description": "the words around the first matching message"},
        }, "conversation_id", "title", "updated_at", "message_id", "snippet")),
        "matches, most recently active first, a page of limit (default 30)",
        parameters=[{"name": "q", "in": "query", "required": True,
                     "schema": {"type": "string", "maxLength": 200}}, *_PAGING])},
    "/api/shares/{share_id}": {
        "parameters": [_in_path("share_id")],
        "delete": _op("revoke_share_by_id", "revoke a link from the list", "204", None, "revoked"),
    },
    "/api/keys": {
        "get": _op("list_keys", "your API keys for /v1 (revoked ones too)",
                   "200", _listing("keys", _ref("ApiKey")), "the keys, newest first"),
        "post": _op("create_key", "make a key for /v1 (Authorization: Bearer <token>) acting as you",
                    "201", _object({"key": _ref("ApiKey"), "token": {
                        "type": "string", "description": "shown only now"}}, "key", "token"),
                    "the key, and its token (never shown again)",
                    _closed({"name": {**_TEXT, "maxLength": 100}}, "name")),
    },
    "/api/attachments": {"post": {
        "operationId": "upload_attachment",
        "summary": "a file for the next message: its text is extracted and kept",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _object(
            {"file": {"type": "string", "minLength": 1, "pattern": _VISIBLE,
                      "description": "the file: text of any kind (the fuzzed subset) or a PDF; "
                                     "images and other binaries get 415"}}, "file")}}},
        "responses": {
            **_ERRORS,
            "201": _json(_ref("Attachment"), "stored: send its id in the message's attachments"),
            "403": _json(_ref("Error"), "posted from another site's page"),
            "413": _json(_ref("Error"), "file_too_large (BCHAT_MAX_ATTACHMENT_BYTES) or "
                                        "storage_quota_exceeded (BCHAT_ATTACHMENT_QUOTA_BYTES)"),
            "415": _json(_ref("Error"), "unsupported_file (images, binaries) or not multipart"),
        },
    }},
    "/api/attachments/{attachment_id}": {
        "parameters": [_in_path("attachment_id")],
        "get": _op("get_attachment", "a file's facts", "200", _ref("Attachment"), "the file"),
        "delete": _op("delete_attachment", "take back a file not sent yet", "204", None,
                      "deleted", also={"409": "already_sent: it goes with its conversation"}),
    },
    "/api/attachments/{attachment_id}/text": {
        "parameters": [_in_path("attachment_id")],
        "get": _op("attachment_text", "a file's extracted text: whole, a page, or lines",
                   "200", _object({"id": _ID, "filename": {"type": "string"},
                                   "text": {"type": "string"},
                                   "page": {"type": "integer", "nullable": True},
                                   "pages": {"type": "integer", "nullable": True},
                                   "lines": {"type": "array", "nullable": True,
                                             "items": {"type": "integer"}}},
                                  "id", "filename", "text"), "the text",
                   parameters=[{"name": "page", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": 999999999}},
                               {"name": "lines", "in": "query", "required": False,
                                "schema": {"type": "string", "pattern": r"^[0-9]{1,9}-[0-9]{1,9}$"},
                                "description": "FIRST-LAST, 1-based, inclusive"}]),
    },
    "/api/attachments/{attachment_id}/content": {
        "parameters": [_in_path("attachment_id")],
        "get": {"operationId": "attachment_content",
                "summary": "an image's bytes, to its owner only (nosniff, a sandbox CSP)",
                "responses": {**_ERRORS, "200": {
                    "description": "the image, as the type its bytes are",
                    "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                for t in ("image/png", "image/jpeg", "image/webp", "image/gif")}}}},
    },
    "/api/conversations/{conversation_id}/files": {
        "parameters": [_CONVERSATION_ID],
        "get": _op(
            "prompt_files", "the text a model is given of a branch's files (browser engine)",
            "200", _object({"blocks": {"type": "object", "additionalProperties": {"type": "string"},
                                       "description": "message id: the file blocks before its text"},
                            "files": {"type": "array", "items": {"type": "object"},
                                      "description": "what was given, for the reply's meta.files"}},
                           "blocks", "files"), "the blocks, fitted to the context",
            parameters=[{"name": "leaf", "in": "query", "required": True, "schema": _ID},
                        {"name": "context", "in": "query", "required": True,
                         "schema": {"type": "integer", "minimum": 64, "maximum": 999999999}},
                        {"name": "max_tokens", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 0, "maximum": 999999999}}]),
    },
    "/api/keys/{key_id}": {
        "parameters": [_in_path("key_id")],
        "delete": _op("revoke_key", "revoke a key: calls made with it get 401", "204", None, "revoked"),
    },
}


def option_schemas(config: Mapping[str, Any] = CONFIG_DEFAULTS) -> dict[str, Any]:
    """What each parser of options.py takes, as schemas: the only description of them."""

    def fields(where: str, description: str, extra: Mapping[str, Any] = {}) -> dict[str, Any]:
        properties = {name: option_schema(name, config) for name in names(where)
                      if name in option_names}
        return {"type": "object", "description": description,
                "properties": {**properties, **extra}}

    option_names = set(names("options")) | set(names("v1"))
    settings = fields("settings", "a conversation's (or the visitor's default) reply settings; "
                      "null removes one",
                      {name: {**schema, "nullable": True} for name, schema in SETTINGS_ONLY.items()})
    return {
        "Settings": {**settings, "additionalProperties": False},
        "Options": {**fields("options", "the socket's chat frame options (docs/protocol.md)"),
                    "additionalProperties": False},
        "ChatCompletionRequest": {
            **fields("v1", "POST /v1/chat/completions (docs/openai-api.md); other fields "
                     "are ignored", REQUEST_FIELDS),
            "required": ["messages"]},
    }


def document(config: Mapping[str, Any] = CONFIG_DEFAULTS) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "bchat JSON API",
            "version": "1",
            "description": "Conversations belong to the browser whose signed cookie made them. "
                           "Writes need Content-Type: application/json; no string in a body may "
                           "hold a NUL character or a lone surrogate (400 bad_text). Errors are "
                           '{"error": {"code", "message"}}.',
        },
        "paths": PATHS,
        "components": {"schemas": {**SCHEMAS, **option_schemas(config)}},
    }
