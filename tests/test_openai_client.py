"""``/v1`` as the official ``openai`` client uses it, against a live server on the tiny model:
``models.retrieve``, 64-bit seeds, ``n`` choices, tool-call arguments in the history, and a
non-streaming caller that hangs up."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import openai
import pytest
from helpers import free_port

# Fixtures (F811 below: pytest takes them by these names): a live server with a key, a worker.
from test_openai_api import api  # noqa: F401
from test_openai_upstreams import through_main_app, worker  # noqa: F401
from test_upstreams import start_worker, stop
from tiny_model import write_tiny_model


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


def test_n_choices_run_side_by_side_and_the_same_seed_gives_the_same_ones(
        api, make_app, make_live_server, worker):  # noqa: F811
    _server, visitor, _key, client = api
    ask = dict(model=client.models.list().data[0].id, temperature=1.5, seed=2**40, n=3,
               messages=[{"role": "user", "content": "tell me something"}], max_tokens=8)
    one = client.chat.completions.create(**{**ask, "n": 1})
    whole = client.chat.completions.create(**ask)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert all(c.finish_reason in ("stop", "length") for c in whole.choices) and all(texts)
    assert texts[0] == one.choices[0].message.content  # choice i takes seed + i
    assert len(set(texts)) > 1, texts  # three seeds, not one reply thrice
    assert whole.usage.prompt_tokens == one.usage.prompt_tokens  # one prompt, counted once
    assert whole.usage.completion_tokens > one.usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert [c.message.content for c in client.chat.completions.create(**ask).choices] == texts

    streamed: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finished, usage, replies = set(), None, {0: set(), 1: set(), 2: set()}
    for chunk in client.chat.completions.create(**ask, stream=True,
                                                stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            streamed[choice.index].append(choice.delta.content or "")
            replies[choice.index].add(chunk.model_extra["bchat"]["message_id"])
            if choice.finish_reason:
                finished.add(choice.index)
    assert ["".join(streamed[i]) for i in range(3)] == texts and finished == {0, 1, 2}
    # Each choice's chunks name its own reply, the same one throughout.
    assert all(len(ids) == 1 for ids in replies.values())
    assert len(set().union(*replies.values())) == 3
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    # A stored call keeps choice 0 as the conversation's reply (one reply to one message).
    conversation = visitor.json("GET", "/api/conversations")[1]["conversations"][0]
    stored = visitor.json("GET", f"/api/conversations/{conversation['id']}")[1]["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == texts[0]

    for n in (0, 5, 2.5):  # 5: above BCHAT_MAX_N
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**{**ask, "n": n})
        assert (err.value.body["code"], err.value.body["param"]) == ("invalid_value", "n")
    # Each choice is one of the caller's replies in flight: room for 2, n=3 is refused.
    server = make_live_server(make_app(MAX_QUEUED_PER_VISITOR=2, MAX_REPLIES_PER_ADDRESS=2,
                                       RATE_LIMIT="1000/minute"))
    _made, token = server.app.extensions["bchat"].keys.create("someone", "ci")
    tight = openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        tight.chat.completions.create(**ask)
    assert len(tight.chat.completions.create(**{**ask, "n": 2}).choices) == 2
    # bchat worker writes one choice a call (bchat asks it for each choice on its own).
    direct = openai.OpenAI(base_url=worker.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        direct.chat.completions.create(**{**ask, "model": direct.models.list().data[0].id})
    assert (err.value.body["code"], err.value.body["param"]) == ("invalid_value", "n")


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


@pytest.mark.parametrize(("store", "n"), [(True, 1), (False, 1), (True, 2)])
def test_a_caller_that_hangs_up_on_a_whole_reply_stops_it_and_frees_its_slot(
        make_app, make_live_server, store, n):
    """One reply at a time for the owner: a run left going after its caller hung up would
    refuse the next call with 429 until it reached max_tokens. With n choices, all n stop."""
    server = make_live_server(make_app(MAX_QUEUED_PER_VISITOR=1, RATE_LIMIT="1000/minute"))
    services = server.app.extensions["bchat"]
    _key, token = services.keys.create("someone", "ci")
    body = json.dumps({"messages": [{"role": "user", "content": "write a lot"}],
                       "max_tokens": server.app.config["MAX_TOKENS_LIMIT"], "temperature": 1,
                       "store": store, "n": n}).encode()
    caller = socket.create_connection(("127.0.0.1", server.port))
    caller.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Authorization: Bearer " + token.encode() + b"\r\n"
                   b"Content-Type: application/json\r\nContent-Length: " +
                   str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 60
    while not [r for r in services.runs.live_runs() if r.owner == "someone" and r.length]:
        assert time.monotonic() < deadline, "the reply never began"
        threading.Event().wait(0.01)
    runs = [r for r in services.runs.live_runs() if r.owner == "someone"]
    assert len(runs) == n  # all n start together, one call
    caller.close()  # hung up mid-reply, before any byte of the answer

    for run in runs:
        assert run.finished.wait(30), "the run went on after its caller hung up"
        reply = run.final_frame["message"]
        assert run.stop_reason == "disconnect", (reply["status"], reply["usage"])
        assert reply["status"] == "stopped"
        assert reply["usage"]["completion_tokens"] < server.app.config["MAX_TOKENS_LIMIT"]
    # The owner's one slot is free again: the next call is answered, not refused with 429.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0)
    reply = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}],
                                           model=client.models.list().data[0].id, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_caller_that_hangs_up_on_bchat_worker_frees_its_one_slot(tmp_path):
    """gunicorn's socket this time: with one slot, a reply left going after its caller hung up
    would keep the next call waiting until its 60000 tokens were written (minutes)."""
    port = free_port()
    model = write_tiny_model(tmp_path / "long-chat.gguf", context_length=65536)
    proc = start_worker(model, port, BCHAT_PARALLEL="1", BCHAT_N_CTX="65536",
                        BCHAT_MAX_TOKENS_LIMIT="60000")
    try:
        url = f"http://127.0.0.1:{port}"
        body = json.dumps({"messages": [{"role": "user", "content": "write a lot"}],
                           "max_tokens": 60000, "temperature": 1}).encode()
        caller = socket.create_connection(("127.0.0.1", port))
        caller.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: application/json\r\nContent-Length: " +
                       str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 60
        def running() -> bool:
            with urllib.request.urlopen(url + "/health") as health:
                return any(m["running"] for m in json.load(health)["activity"].values())

        while not running():
            assert time.monotonic() < deadline, "the reply never began"
            threading.Event().wait(0.01)
        caller.close()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        reply = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}],
                                               model=client.models.list().data[0].id,
                                               max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        stop(proc)
