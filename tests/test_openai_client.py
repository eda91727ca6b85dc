"""``/v1`` as the official ``openai`` client uses it, against a live server on the tiny model:
``models.retrieve``, 64-bit seeds, tool-call arguments in the history, and a non-streaming
caller that hangs up."""

from __future__ import annotations

import openai
import pytest
from test_openai_api import api  # noqa: F401  (a fixture, used as an argument below)
from test_openai_upstreams import through_main_app, worker  # noqa: F401  (worker: a fixture)


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
