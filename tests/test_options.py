"""The options the app accepts are the ones its OpenAPI document publishes, both ways.

Each parser (the socket's options, conversation settings, the visitor's defaults, a /v1 body)
is probed with every field name any of them knows and some OpenAI fields none takes: a
documented field takes its example and refuses garbage; an undocumented one is refused (or, in
a /v1 body, ignored whatever its value, as OpenAI-compatible servers do).
"""

from __future__ import annotations

import html
import json
import re

import jsonschema_rs
import pytest

from webapp.errors import Invalid
from webapp.openai_dialect import parse_chat_request
from webapp.options import GenerationOptions

GARBAGE = [[]]  # no field takes a list holding an empty list
NOT_TAKEN = ("logprobs", "top_logprobs", "logit_bias", "user", "top_k", "min_p", "suffix",
             "model_id", "options")
USER = [{"role": "user", "content": "hi"}]


def _accepts(parse, raw) -> bool:
    try:
        parse(raw)
    except Invalid:
        return False
    return True


def test_every_field_each_parser_accepts_is_documented_and_the_other_way_round(app, client):
    client.get("/")
    document = client.get("/api/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    services = app.extensions["bchat"]

    def put_defaults(raw):
        response = client.put("/api/defaults", json={"settings": raw})
        assert response.status_code in (200, 400), response.data[:200]
        if response.status_code == 400:
            raise Invalid(response.get_json()["error"]["code"], "refused")

    parsers = {
        # what the socket's chat frame options go through (runs.service._prepare)
        "Options": lambda raw: GenerationOptions.parse(raw, app.config),
        "Settings": services.chats.clean_settings,
        "defaults": put_defaults,
        "ChatCompletionRequest": lambda raw: parse_chat_request(
            {"messages": USER, **raw} if "messages" not in raw else raw, app.config),
    }
    published = {name: schemas["Settings" if name == "defaults" else name]["properties"]
                 for name in parsers}
    candidates = set(NOT_TAKEN).union(*published.values())
    for name, parse in parsers.items():
        fields = published[name]
        assert fields, name
        for field in sorted(candidates):
            if field in fields:
                example = fields[field]["example"]
                # with the fields it is only valid beside (top_logprobs needs logprobs: true)
                beside = fields[field].get("x-requires", {})
                assert _accepts(parse, {**beside, field: example}), (name, field, example)
                assert not _accepts(parse, {**beside, field: GARBAGE}), (name, field)
                if beside:
                    assert not _accepts(parse, {field: example}), (name, field, "alone")
            elif name == "ChatCompletionRequest":  # read by nobody: any value is ignored
                assert _accepts(parse, {field: GARBAGE}), (name, field)
            else:
                assert not _accepts(parse, {field: 1}), (name, field)


def _body_schema(document: dict, path: str, method: str) -> jsonschema_rs.Validator:
    schema = document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema_rs.validator_for({**schema, "components": document["components"]})


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "person", "schema": {"type": "object"}}},
    {"type": "json_object"},
])
def test_a_settings_patch_with_response_format_is_accepted_and_published(client, response_format):
    client.get("/")
    document = client.get("/api/openapi.json").get_json()
    conversation = client.post("/api/conversations", json={}).get_json()
    body = {"settings": {"response_format": response_format, "temperature": 0.2}}
    path = "/api/conversations/{conversation_id}"
    validator = _body_schema(document, path, "patch")
    assert validator.is_valid(body), list(validator.iter_errors(body))
    # the check has teeth: a format the app refuses is invalid in the document too
    assert not validator.is_valid({"settings": {"response_format": {"type": "xml"}}})
    response = client.patch(f"/api/conversations/{conversation['id']}", json=body)
    assert response.status_code == 200, response.data[:300]
    assert response.get_json()["settings"]["response_format"] == response_format
    refused = client.patch(f"/api/conversations/{conversation['id']}",
                           json={"settings": {"response_format": {"type": "xml"}}})
    assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "bad_settings"


def test_the_page_the_parser_and_the_document_share_each_default_and_range(make_app):
    app = make_app(MAX_TOKENS=64, MAX_TOKENS_LIMIT=100, MAX_MESSAGE_CHARS=900)
    client = app.test_client()
    page = client.get("/").get_data(as_text=True)
    offered = json.loads(html.unescape(re.search(r'data-options="([^"]*)"', page)[1]))
    published = client.get("/api/openapi.json").get_json()["components"]["schemas"]["Settings"]
    parsed = GenerationOptions.parse({}, app.config)
    assert offered["max_tokens"] == {"default": 64, "min": 1, "max": 100, "step": 1}
    assert offered["system"] == {"default": None, "max_length": 900}
    assert published["properties"]["system"]["maxLength"] == 900
    for name, option in offered.items():
        if name != "system":
            schema = published["properties"][name]
            assert (schema["minimum"], schema["maximum"]) == (option["min"], option["max"]), name
            assert getattr(parsed, name) == option["default"], name
    # the form's inputs start from the same values
    assert 'max="100"' in page and 'value="64"' in page and 'maxlength="900"' in page
