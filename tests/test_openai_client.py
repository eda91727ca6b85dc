"""``/v1`` as the official ``openai`` client uses it, against a live server on the tiny model:
``models.retrieve``, 64-bit seeds, tool-call arguments in the history, and a non-streaming
caller that hangs up."""

from __future__ import annotations

import openai
import pytest

# Fixtures (F811 below: pytest takes them by these names): a live server with a key, a worker.
from test_openai_api import api  # noqa: F401
from test_openai_upstreams import through_main_app, worker  # noqa: F401


def test_models_retrieve_says_where_each_model_runs(api, make_app, make_live_server,  # noqa: F811
                                                    worker, tiny_model):  # noqa: F811
    _server, _visitor, _key, client = api
    listed = client.models.list().data
    model = client.models.retrieve(listed[0].id)
    assert (model.id, model.object, model.owned_by) == (listed[0].id, "model", "bchat")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert err.value.body["type"] == "invalid_request_error"

    direct = openai.OpenAI(base_url=worker.url + "/v1", api_key="none", max_retries=0)
    served = direct.models.list().data[0].id
    assert direct.models.retrieve(served).owned_by == "bchat"
    with pytest.raises(openai.NotFoundError):
        direct.models.retrieve("no-such-model")
    # Through the main app, a worker's model is an upstream's: owned by its name.
    upstream = through_main_app(make_app, make_live_server, tiny_model, worker.url + "/v1")
    assert upstream.models.retrieve(served).owned_by == "127.0.0.1"


def test_64_bit_seeds_are_taken_and_the_same_seed_gives_the_same_reply(api):  # noqa: F811
    _server, _visitor, _key, client = api
    user = [{"role": "user", "content": "tell me something"}]

    def reply(seed: int) -> str:
        return client.chat.completions.create(model=client.models.list().data[0].id,
                                              messages=user, max_tokens=12, temperature=1.5,
                                              seed=seed).choices[0].message.content

    big = 2**62 + 12345
    first = reply(big)
    assert reply(big) == first
    # Reduced modulo 2**32 - 1 where llama.cpp takes it (whose 0xFFFFFFFF means "random").
    assert reply(big - (2**32 - 1)) == first
    for seed in (-(2**63), 2**63 - 1, 2**32 - 1):
        assert reply(seed) == reply(seed % (2**32 - 1))
    assert reply(2**32 - 1) == reply(2**32 - 1)  # not llama.cpp's random seed
    for seed in (2**63, -(2**63) - 1, 1.5, "7"):
        with pytest.raises(openai.BadRequestError) as err:
            reply(seed)
        assert err.value.body["param"] in ("seed", None) and err.value.status_code == 400


def test_tool_call_arguments_in_the_history_must_be_json(api):  # noqa: F811
    _server, _visitor, _key, client = api
    model = client.models.list().data[0].id

    def history(arguments: str) -> list[dict]:
        return [{"role": "system", "content": "use tools"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}},
                    {"id": "call_2", "type": "function",
                     "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]

    for arguments in ("{", "", "{'city': 'Paris'}", '{"n": NaN}'):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=history(arguments),
                                           max_tokens=2)
        body = err.value.body
        assert (body["code"], body["type"]) == ("invalid_value", "invalid_request_error")
        assert body["param"] == "messages[2].tool_calls[1].function.arguments"
    reply = client.chat.completions.create(model=model, messages=history('{"city": "Paris"}'),
                                           max_tokens=2)
    assert reply.choices[0].message.content is not None
