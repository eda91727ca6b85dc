"""Structured outputs and tool calls through upstreams: `bchat worker` (which enforces them
itself, with the same parser as /v1) and llama-cpp-python's own server, both as real
processes on loopback, reached directly and through the main app's /v1."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema_rs
import openai
import pytest
from helpers import free_port, wait_for_http
from test_openai_api import LOOSE, PERSON, TIME_TOOL, WEATHER_TOOL, collect, person_format
from test_upstreams import start_worker, stop


@pytest.fixture
def worker(tiny_model):
    port = free_port()
    proc = start_worker(tiny_model, port)
    proc.url = f"http://127.0.0.1:{port}"
    yield proc
    stop(proc)


def through_main_app(make_app, make_live_server, tiny_model, base_url: str, **config):
    """The main app with only this upstream, and an openai client holding a key for it."""
    server = make_live_server(make_app(OPENAI_BASE_URL=base_url, **config,
                                       MODEL_PATH=str(tiny_model.parent / "absent"), **LOOSE))
    return server.openai_client()


def check_structured_and_tools(client: openai.OpenAI, model: str) -> None:
    validator = jsonschema_rs.validator_for(PERSON)
    user = [{"role": "user", "content": "a person"}]
    for stream in (False, True):
        reply = client.chat.completions.create(model=model, messages=user, max_tokens=400,
                                               temperature=0, response_format=person_format(),
                                               stream=stream)
        text = collect(reply)[0] if stream else reply.choices[0].message.content
        validator.validate(json.loads(text))
    first = client.chat.completions.create(model=model, messages=user, max_tokens=150,
                                           temperature=0, tools=[WEATHER_TOOL, TIME_TOOL],
                                           tool_choice="required")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    tool = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}[call.function.name]
    jsonschema_rs.validator_for(tool["function"]["parameters"]).validate(
        json.loads(call.function.arguments))
    # streamed: the call arrives as tool_call deltas
    _content, calls, finish, _usage = collect(client.chat.completions.create(
        model=model, messages=user, max_tokens=150, temperature=0, tools=[TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, stream=True))
    assert finish == "tool_calls" and calls[0].function.name == "get_time"
    # the result goes back as a tool message; the answer is text
    final = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
        *user, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_bchat_worker_enforces_formats_itself(worker):
    client = openai.OpenAI(base_url=worker.url + "/v1", api_key="none", max_retries=0)
    check_structured_and_tools(client, "tiny-chat")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"schema": {"type": "?"}}})


def test_main_app_passes_formats_and_tools_to_the_worker(make_app, make_live_server, worker,
                                                         tiny_model):
    client = through_main_app(make_app, make_live_server, tiny_model, worker.url + "/v1",
                              OPENAI_MODELS=["tiny-chat"])
    check_structured_and_tools(client, "tiny-chat")


def test_llama_cpp_server_gets_formats_passed_through(make_app, make_live_server, tiny_model):
    """llama-cpp-python's server only knows {"type": "json_object", "schema": S} (DESIGN.md),
    which /v1 passes through as given; its defaults interrupt running requests, so not those."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_model), "--port", str(port),
         "--n_ctx", "4096", "--n_threads", "2", "--interrupt_requests", "False"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/models", proc)
        client = through_main_app(make_app, make_live_server, tiny_model,
                                  f"http://127.0.0.1:{port}/v1", OPENAI_MODELS=["llama-server-tiny"])
        # Its converter (the vendored Python one) ignores integer bounds: none asked of it here.
        schema = json.loads(json.dumps(PERSON))
        del schema["properties"]["age"]["minimum"], schema["properties"]["age"]["maximum"]
        del schema["properties"]["pets"]["items"]["properties"]["legs"]["maximum"]
        validator = jsonschema_rs.validator_for(schema)
        for stream in (False, True):
            reply = client.chat.completions.create(
                model="llama-server-tiny", messages=[{"role": "user", "content": "a person"}],
                max_tokens=400, temperature=0, stream=stream,
                response_format={"type": "json_object", "schema": schema})
            text = collect(reply)[0] if stream else reply.choices[0].message.content
            validator.validate(json.loads(text))
        reply = client.chat.completions.create(
            model="llama-server-tiny", messages=[{"role": "user", "content": "time?"}],
            max_tokens=150, temperature=0, tools=[TIME_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_time"}})
        call = reply.choices[0].message.tool_calls[0]
        assert call.function.name == "get_time"
        assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    finally:
        stop(proc)


# -- sampling fields through the main app: passed through, and what the upstream gave returned --

HI = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def llama_server(tiny_model):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_model), "--port", str(port),
         "--n_ctx", "2048", "--n_threads", "1", "--interrupt_requests", "False"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    proc.url = f"http://127.0.0.1:{port}"
    wait_for_http(proc.url + "/v1/models", proc)
    yield proc
    stop(proc)


def check_seed_and_n(client: openai.OpenAI, direct: openai.OpenAI, model: str) -> None:
    """The seed goes through as given, and n choices are n calls upstream, choice i with
    seed + i: each choice is the reply the upstream itself gives that seed."""
    ask = dict(model=model, messages=HI, max_tokens=6, temperature=1.5)

    def upstream(seed: int) -> str:
        return direct.chat.completions.create(**ask, seed=seed).choices[0].message.content

    both = client.chat.completions.create(**ask, seed=11, n=2)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.message.content for c in both.choices] == [upstream(11), upstream(12)]
    assert client.chat.completions.create(**ask, seed=11).choices[0].message.content == upstream(11)


def refused(call) -> dict:
    """The body of the 400 a refused call gets, streamed or not."""
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            reply = call(stream)
            if stream:
                list(reply)
        body = err.value.body
    return body


def test_sampling_fields_through_the_main_app_to_a_bchat_worker(make_app, make_live_server,
                                                                 worker, tiny_model):
    client = through_main_app(make_app, make_live_server, tiny_model, worker.url + "/v1",
                              OPENAI_MODELS=["tiny-chat"])
    direct = openai.OpenAI(base_url=worker.url + "/v1", api_key="none", max_retries=0)
    assert client.models.retrieve("tiny-chat").owned_by == "127.0.0.1"
    check_seed_and_n(client, direct, "tiny-chat")
    # The worker checks logit_bias against its model's vocabulary: its refusal, as a 400.
    body = refused(lambda stream: client.chat.completions.create(
        model="tiny-chat", messages=HI, max_tokens=2, stream=stream, logit_bias={"99999": 1}))
    assert body["code"] == "upstream_rejected" and "logit_bias" in body["message"], body
    assert "99999" in body["message"] and "vocabulary" in body["message"], body


def test_sampling_fields_through_the_main_app_to_llama_cpp_server(make_app, make_live_server,
                                                                  llama_server, tiny_model):
    from llama_cpp import Llama

    client = through_main_app(make_app, make_live_server, tiny_model, llama_server.url + "/v1",
                              OPENAI_MODELS=["llama-server-tiny"])
    direct = openai.OpenAI(base_url=llama_server.url + "/v1", api_key="none", max_retries=0)
    model = "llama-server-tiny"
    # It has no GET /v1/models/{id}; bchat answers from the models it lists for it.
    with pytest.raises(openai.NotFoundError):
        direct.models.retrieve(model)
    assert client.models.retrieve(model).owned_by == "127.0.0.1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")

    # logprobs: its own figures, unchanged, whole and streamed.
    ask = dict(model=model, messages=HI, max_tokens=4, temperature=0, logprobs=True,
               top_logprobs=2)

    def figures(entries) -> list:
        return [(e.token, round(e.logprob, 5), [(t.token, round(t.logprob, 5))
                                                for t in e.top_logprobs]) for e in entries]

    theirs = direct.chat.completions.create(**ask).choices[0]
    ours = client.chat.completions.create(**ask).choices[0]
    assert ours.message.content == theirs.message.content
    assert figures(ours.logprobs.content) == figures(theirs.logprobs.content)
    assert len(theirs.logprobs.content) == 4 and all(
        len(e.top_logprobs) == 2 for e in theirs.logprobs.content)
    streamed = [e for chunk in client.chat.completions.create(stream=True, **ask)
                for choice in chunk.choices
                for e in (choice.logprobs.content if choice.logprobs else [])]
    assert figures(streamed) == figures(theirs.logprobs.content)

    # logit_bias +100 forces a token (the ids are the upstream's own).
    vocab = Llama(model_path=str(tiny_model), vocab_only=True, verbose=False)
    cat = next(t for t in range(vocab.n_vocab()) if vocab.detokenize([t]) == b"cat")
    forced = client.chat.completions.create(model=model, messages=HI, max_tokens=3,
                                            temperature=0, logit_bias={str(cat): 100})
    assert forced.choices[0].message.content == "cat" * 3

    check_seed_and_n(client, direct, model)
    # A field it refuses (its response_format knows json_object only): its reason, as a 400,
    # though it answers such a body with a 500 of its own.
    body = refused(lambda stream: client.chat.completions.create(
        model=model, messages=HI, max_tokens=2, stream=stream, response_format=person_format()))
    assert body["code"] == "upstream_rejected", body
    assert "response_format.type" in body["message"] and "json_object" in body["message"], body
