"""Structured outputs on the real bundled SmolLM2 (slow): a model that writes words, held to
a nested schema by the grammar, every reply valid; and a tool call it is made to make."""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest
from test_openai_api import LOOSE, PERSON, WEATHER_TOOL, person_format

pytestmark = pytest.mark.slow


def test_smollm2_json_schema_and_tool_call(make_app, make_live_server, bundled_model):
    server = make_live_server(make_app(MODEL_PATH=str(bundled_model), **LOOSE))
    _key, token = server.app.extensions["bchat"].keys.create("someone", "ci")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0)
    model = client.models.list().data[0].id
    validator = jsonschema_rs.validator_for(PERSON)
    for seed, prompt in enumerate(["Describe Alice, who has a cat.",
                                   "Describe a calm man with two dogs."]):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], seed=seed,
            temperature=0.7, max_tokens=200, response_format=person_format())
        assert reply.choices[0].finish_reason == "stop"
        validator.validate(json.loads(reply.choices[0].message.content))
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the weather in Rome this week?"}],
        temperature=0, max_tokens=100, tools=[WEATHER_TOOL], tool_choice="required")
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema_rs.validator_for(WEATHER_TOOL["function"]["parameters"]).validate(
        json.loads(call.function.arguments))
