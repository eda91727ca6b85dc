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
    client = server.openai_client()
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


@pytest.fixture(scope="module")
def smollm2(bundled_model):
    from llama_cpp import Llama

    return Llama(model_path=str(bundled_model), vocab_only=True, verbose=False)


def api_client(make_app, make_live_server, bundled_model) -> tuple[openai.OpenAI, str]:
    server = make_live_server(make_app(MODEL_PATH=str(bundled_model), **LOOSE))
    client = server.openai_client()
    return client, client.models.list().data[0].id


def test_smollm2_n_choices_with_a_seed(make_app, make_live_server, bundled_model):
    client, model = api_client(make_app, make_live_server, bundled_model)
    ask = dict(model=model, messages=[{"role": "user", "content": "Tell me a story."}], n=3,
               seed=2**40 + 5, temperature=1.0, max_tokens=6)
    whole = client.chat.completions.create(**ask)
    texts = [c.message.content for c in whole.choices]
    assert [c.index for c in whole.choices] == [0, 1, 2] and all(texts)
    assert len(set(texts)) > 1, texts  # three seeds (seed + i), not one reply thrice
    assert [c.message.content for c in client.chat.completions.create(**ask).choices] == texts


def test_smollm2_logit_bias_bans_and_forces_a_token(make_app, make_live_server, bundled_model,
                                                    smollm2):
    client, model = api_client(make_app, make_live_server, bundled_model)

    def first(max_tokens: int = 1, **extra) -> tuple[str, bytes]:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], temperature=0,
            max_tokens=max_tokens, logprobs=True, **extra)
        return reply.choices[0].message.content, bytes(reply.choices[0].logprobs.content[0].bytes)

    def token_id(data: bytes) -> int:
        ids = smollm2.tokenize(data, add_bos=False, special=True)
        assert len(ids) == 1 and smollm2.detokenize(ids) == data, ids
        return ids[0]

    _text, written = first()
    banned = token_id(written)
    _text, instead = first(logit_bias={str(banned): -100})
    assert instead != written  # the token the model writes first, banned
    forced = token_id(b" banana")
    text, _ = first(3, logit_bias={str(forced): 100})
    assert text == " banana" * 3
