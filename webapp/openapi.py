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


def _responses(ok: str, schema: dict[str, Any] | None, description: str) -> dict[str, Any]:
    responses: dict[str, Any] = dict(_ERRORS)
    responses[ok] = {"description": description} if schema is None else _json(schema, description)
    return responses


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _closed(properties: dict[str, Any], *required: str, **more: Any) -> dict[str, Any]:
    """A request body's object: these properties, no others."""
    return {"type": "object", "additionalProperties": False, "properties": properties,
            **({"required": list(required)} if required else {}), **more}


def _listing(key: str, items: dict[str, Any]) -> dict[str, Any]:
    """An answer ``{key: [items]}``."""
    return {"type": "object", "required": [key],
            "properties": {key: {"type": "array", "items": items}}}


def _in_path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _ID}


_CONVERSATION_ID = _in_path("conversation_id")
_STATUS = {"type": "string", "enum": list(STATUSES)}
_SETTINGS_OUT = {"type": "object", "required": ["settings"],
                 "properties": {"settings": {"type": "object"}}}

# A benchmark's figures: measured values, bounded so a typo cannot pose as a result.
_FIGURE = {"type": "number", "minimum": 0, "maximum": 10_000_000, "nullable": True}
_TALLY = {"type": "integer", "minimum": 0, "maximum": 10_000_000, "nullable": True}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "Conversation": {
        "type": "object",
        "required": ["id", "title", "created_at", "updated_at"],
        "properties": {
            "id": _ID, "title": {"type": "string"}, "created_at": _TIME, "updated_at": _TIME,
            "shared": {"type": "boolean"},
            "settings": {"type": "object"},
            "current_message_id": {**_ID, "nullable": True},
            "source": {"type": "string", "enum": ["chat", "api"],
                       "description": "api: stored by a /v1 call made with an API key"},
            "messages": {"type": "array", "items": _ref("Message")},
        },
    },
    "ApiKey": {
        "type": "object",
        "required": ["id", "name", "prefix", "created_at", "revoked"],
        "properties": {
            "id": _ID, "name": {"type": "string"},
            "prefix": {"type": "string", "description": "the token's first characters"},
            "created_at": _TIME,
            "last_used_at": {**_TIME, "nullable": True},
            "revoked": {"type": "boolean"},
            "revoked_at": {**_TIME, "nullable": True},
        },
    },
    "Message": {
        "type": "object",
        "required": ["id", "role", "content", "status", "created_at"],
        "properties": {
            "id": _ID,
            "parent_id": {**_ID, "nullable": True},
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "content": {"type": "string"},
            "status": _STATUS,
            "created_at": _TIME,
            "engine": {"type": "string", "enum": ["server", "browser"], "nullable": True},
            "backend": {"type": "string", "nullable": True},
            "model": {"type": "string", "nullable": True},
            "usage": {
                "type": "object",
                "properties": {"prompt_tokens": _COUNT, "completion_tokens": _COUNT},
            },
            "tokens_per_second": {"type": "number", "minimum": 0, "nullable": True},
            "finish_reason": {"type": "string", "nullable": True},
            "meta": {"type": "object"},
        },
    },
    "Provenance": _closed({
        "engine": {"type": "string", "enum": ["browser"]},
        "backend": {"type": "string", "maxLength": 200, "nullable": True},
        "model": {"type": "string", "maxLength": 200, "nullable": True},
        "prompt_tokens": _COUNT,
        "completion_tokens": _COUNT,
        "tokens_per_second": _SPEED,
        "finish_reason": {"type": "string", "maxLength": 200, "nullable": True},
        "meta": _META_IN,
    }),
    "NewMessage": _closed({
        "role": {"type": "string", "enum": ["user", "assistant"]},
        "content": {"type": "string", "maxLength": 32000, "pattern": _VISIBLE},
        "status": _STATUS,
        "provenance": _ref("Provenance"),
        "parent_id": {**_ID, "nullable": True,
                      "description": "absent: after the current leaf; null: a new root"},
    }, "role", "content"),
    "ImportMessage": _closed({
        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
        "content": {"type": "string", "maxLength": 32000},
        "status": _STATUS,
        "created_at": _TIME_IN,
        "engine": {"type": "string", "enum": ["server", "browser"], "nullable": True},
        "backend": {"type": "string", "maxLength": 200, "nullable": True},
        "model": {"type": "string", "maxLength": 200, "nullable": True},
        "usage": _closed({"prompt_tokens": _COUNT, "completion_tokens": _COUNT}, nullable=True),
        "tokens_per_second": _SPEED,
        "finish_reason": {"type": "string", "maxLength": 200, "nullable": True},
        "meta": _META_IN,
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
                    "ids, parent ids, settings and current_message_id, import too"),
    "Share": {
        "type": "object",
        "required": ["id", "url", "title", "conversation_id", "messages"],
        "properties": {
            "id": _ID,
            "url": {"type": "string", "nullable": True},
            "title": {"type": "string"},
            "conversation_id": _ID,
            "conversation_exists": {"type": "boolean"},
            "messages": {"type": "integer", "minimum": 0},
            "created_at": _TIME,
            "updated_at": _TIME,
        },
    },
    "Export": {
        "type": "object",
        "required": ["format", "version", "conversation", "messages"],
        "properties": {
            "format": {"type": "string", "enum": ["bchat.conversation"]},
            "version": {"type": "integer", "enum": [2]},
            "exported_at": _TIME,
            "conversation": {
                "type": "object",
                "required": ["title"],
                "properties": {
                    "title": {"type": "string", "minLength": 1, "maxLength": 200},
                    "created_at": {**_TIME, "nullable": True},
                    "updated_at": {**_TIME, "nullable": True},
                },
            },
            "messages": {"type": "array", "items": _ref("Message")},
        },
    },
}

PATHS: dict[str, Any] = {
    "/healthz": {"get": {
        "operationId": "healthz",
        "summary": "the database answers; how many models; 503 naming a dead or stuck model",
        "responses": {**_responses("200", {
            "type": "object", "required": ["status", "models"],
            "properties": {"status": {"type": "string"}, "models": {"type": "integer"},
                           "runs": {"type": "integer"}},
        }, "healthy"), "503": {"description": "an inference thread is dead or stuck"}},
    }},
    "/api/openapi.json": {"get": {
        "operationId": "openapi", "summary": "this document",
        "responses": _responses("200", {"type": "object"}, "the OpenAPI document"),
    }},
    "/api/models": {"get": {
        "operationId": "models", "summary": "every model, where it runs, and its facts",
        "responses": _responses("200", {
            "type": "object", "required": ["models"],
            "properties": {"models": {"type": "array", "items": {"type": "object"}},
                           "default": {"type": "string", "nullable": True}},
        }, "the models"),
    }},
    "/api/conversations": {
        "get": {
            "operationId": "list_conversations", "summary": "your conversations, newest first",
            "responses": _responses("200", _listing("conversations", _ref("Conversation")),
                                    "the list"),
        },
        "post": {
            "operationId": "create_conversation", "summary": "a new, empty conversation",
            "requestBody": _body(_closed({"title": _TEXT})),
            "responses": _responses("201", _ref("Conversation"), "created"),
        },
    },
    "/api/conversations/import": {"post": {
        "operationId": "import_conversation", "summary": "an export file back into a new conversation",
        "requestBody": _body(_ref("Import")),
        "responses": _responses("201", _ref("Conversation"), "imported"),
    }},
    "/api/conversations/{conversation_id}": {
        "parameters": [_CONVERSATION_ID],
        "get": {
            "operationId": "get_conversation", "summary": "a conversation with its messages",
            "responses": _responses("200", _ref("Conversation"), "the conversation"),
        },
        "patch": {
            "operationId": "update_conversation",
            "summary": "rename, switch branch (to the newest leaf below a message), change settings",
            "requestBody": _body(_closed({"title": _TEXT, "current_message_id": _ID,
                                          "settings": _ref("Settings")}, minProperties=1)),
            "responses": _responses("200", _ref("Conversation"), "changed"),
        },
        "delete": {
            "operationId": "delete_conversation", "summary": "delete, with its messages",
            "responses": _responses("204", None, "deleted"),
        },
    },
    "/api/benchmarks": {
        "get": {
            "operationId": "list_benchmarks",
            "summary": "everyone's runs of the fixed prompt set, newest first, and the prompt set",
            "responses": _responses("200", {"type": "object", "required": ["benchmarks", "prompts"],
                                            "properties": {"benchmarks": {"type": "array"},
                                                           "prompts": {"type": "array"},
                                                           "tokens": {"type": "integer"},
                                                           "seed": {"type": "integer"}}},
                                    "the runs"),
        },
        "post": {
            "operationId": "add_benchmark", "summary": "store a run made in the page (browser engine)",
            "requestBody": _body(_closed({
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
                    "completion_tokens": _TALLY, "prompt_ms": _FIGURE, "prompt_tps": _FIGURE,
                    "decode_tps": _FIGURE, "ttft_ms": _FIGURE, "cold": {"type": "boolean"}},
                    "prompt")},
            }, "backend", "model", "results")),
            "responses": {**_responses("201", {"type": "object"}, "stored"),
                          "429": {"description": "too many posts from this visitor or address "
                                                 "(BCHAT_BENCHMARK_RATE_LIMIT); see Retry-After"}},
        },
    },
    "/api/benchmarks/server": {"post": {
        "operationId": "run_server_benchmark", "summary": "run the prompt set on a server model now",
        "requestBody": _body(_closed({
            "model": {"type": "string", "minLength": 1, "maxLength": 200},
            "tokens": {"type": "integer", "minimum": 1, "maximum": 8}})),
        "responses": {**_responses("201", {"type": "object"}, "the run, stored"),
                      "409": {"description": "another server benchmark is running"},
                      "429": {"description": "rate-limited"}},
    }},
    "/api/defaults": {
        "get": {
            "operationId": "get_defaults", "summary": "the settings a new conversation starts from",
            "responses": _responses("200", _SETTINGS_OUT, "the visitor's defaults"),
        },
        "put": {
            "operationId": "put_defaults", "summary": "change the visitor's defaults",
            "requestBody": _body(_closed({"settings": _ref("Settings")}, "settings")),
            "responses": _responses("200", _SETTINGS_OUT, "stored"),
        },
    },
    "/api/conversations/{conversation_id}/messages": {
        "parameters": [_CONVERSATION_ID],
        "post": {
            "operationId": "add_message",
            "summary": "store a message written in the page (browser engine)",
            "requestBody": _body(_ref("NewMessage")),
            "responses": _responses("201", _ref("Message"), "stored"),
        },
    },
    "/api/conversations/{conversation_id}/messages/{message_id}": {
        "parameters": [_CONVERSATION_ID, _in_path("message_id")],
        "patch": {
            "operationId": "update_message",
            "summary": "grow or settle a reply the page is writing (browser engine)",
            "requestBody": _body(_closed({"content": {"type": "string", "maxLength": 32000},
                                          "status": _STATUS, "provenance": _ref("Provenance")},
                                         "content")),
            "responses": {**_responses("200", _ref("Message"), "updated"),
                          "409": {"description": "the reply is already final"}},
        },
    },
    "/api/conversations/{conversation_id}/share": {
        "parameters": [_CONVERSATION_ID],
        "post": {
            "operationId": "share_conversation", "summary": "create or refresh the share link",
            "requestBody": _body(_closed({"new_link": {"type": "boolean"}})),
            "responses": _responses("200", _ref("Share"), "the link"),
        },
        "delete": {
            "operationId": "revoke_share", "summary": "revoke the link",
            "responses": _responses("204", None, "revoked"),
        },
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
    "/api/shares": {"get": {
        "operationId": "list_shares", "summary": "your share links",
        "responses": _responses("200", _listing("shares", _ref("Share")), "the links"),
    }},
    "/api/search": {"get": {
        "operationId": "search_conversations",
        "summary": "your conversations whose title or messages hold every word of q",
        "parameters": [{"name": "q", "in": "query", "required": True,
                        "schema": {"type": "string", "maxLength": 200}}],
        "responses": _responses("200", _listing("results", {
            "type": "object",
            "required": ["conversation_id", "title", "updated_at", "message_id", "snippet"],
            "properties": {
                "conversation_id": _ID, "title": {"type": "string"}, "updated_at": _TIME,
                "message_id": {**_ID, "nullable": True},
                "snippet": {"type": "string",
                            "description": "the words around the first matching message"},
            },
        }), "matches, most recently active first (at most 30)"),
    }},
    "/api/shares/{share_id}": {
        "parameters": [_in_path("share_id")],
        "delete": {
            "operationId": "revoke_share_by_id", "summary": "revoke a link from the list",
            "responses": _responses("204", None, "revoked"),
        },
    },
    "/api/keys": {
        "get": {
            "operationId": "list_keys", "summary": "your API keys for /v1 (revoked ones too)",
            "responses": _responses("200", _listing("keys", _ref("ApiKey")),
                                    "the keys, newest first"),
        },
        "post": {
            "operationId": "create_key",
            "summary": "make a key for /v1 (Authorization: Bearer <token>) acting as you",
            "requestBody": _body(_closed({"name": {**_TEXT, "maxLength": 100}}, "name")),
            "responses": _responses("201", {
                "type": "object", "required": ["key", "token"],
                "properties": {"key": _ref("ApiKey"),
                               "token": {"type": "string", "description": "shown only now"}},
            }, "the key, and its token (never shown again)"),
        },
    },
    "/api/keys/{key_id}": {
        "parameters": [_in_path("key_id")],
        "delete": {
            "operationId": "revoke_key", "summary": "revoke a key: calls made with it get 401",
            "responses": _responses("204", None, "revoked"),
        },
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
