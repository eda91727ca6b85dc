"""``/v1`` on the main app, through the official ``openai`` client against a live server:
keys, streaming and not, structured outputs, tool calls, stop, and OpenAI-shaped errors.

The tiny test model has random weights, so a reply that parses and validates against a
nested schema does so only because the grammar made it."""

from __future__ import annotations

import json
import threading
from typing import Literal

import jsonschema_rs
import openai
import pytest
from pydantic import BaseModel, Field

from webapp.engines.base import Token
from webapp.engines.structured import StopMatcher, split_reply
from webapp.options import GenerationOptions

LOOSE = {"MAX_QUEUED_PER_VISITOR": 8, "RATE_LIMIT": "1000/minute"}

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "pets": {"type": "array", "maxItems": 2, "items": {
            "type": "object",
            "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer",
                                                                      "maximum": 9}},
            "required": ["kind", "legs"], "additionalProperties": False}},
    },
    "required": ["name", "age", "mood", "pets"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def person_format(schema=PERSON) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


@pytest.fixture
def api(make_app, make_live_server):
    """A live server, a visitor with a cookie, a key made by that visitor, and a client."""
    server = make_live_server(make_app(**LOOSE))
    visitor = server.session()
    visitor.visit()
    status, body = visitor.json("POST", "/api/keys", {"name": "tests"})
    assert status == 201 and body["token"].startswith("bchat_")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=body["token"], max_retries=0)
    return server, visitor, body, client


def collect(stream) -> tuple[str, list, str | None, object]:
    """(content, tool call deltas, finish_reason, usage) of a streamed completion."""
    text, calls, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            calls.extend(choice.delta.tool_calls or [])
            finish = choice.finish_reason or finish
    return "".join(text), calls, finish, usage


# -- keys -----------------------------------------------------------------------------------


def test_keys_are_shown_once_listed_and_revoked(api):
    server, visitor, made, client = api
    status, listed = visitor.json("GET", "/api/keys")
    assert status == 200 and [k["id"] for k in listed["keys"]] == [made["key"]["id"]]
    assert "token" not in json.dumps(listed) and made["token"] not in json.dumps(listed)
    assert made["token"].startswith(listed["keys"][0]["prefix"])
    assert client.models.list().data[0].id == "tiny-chat"
    status, listed = visitor.json("GET", "/api/keys")
    assert listed["keys"][0]["last_used_at"] is not None
    # another visitor can neither see nor revoke it
    other = server.session()
    other.visit()
    assert other.json("GET", "/api/keys") == (200, {"keys": []})
    assert other.json("DELETE", f"/api/keys/{made['key']['id']}")[0] == 404
    assert visitor.json("DELETE", f"/api/keys/{made['key']['id']}")[0] == 204
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.body["code"] == "invalid_api_key"
    assert visitor.json("GET", "/api/keys")[1]["keys"][0]["revoked"] is True
    assert visitor.json("POST", "/api/keys", {"name": "  "})[0] == 400


def test_without_a_valid_key_v1_answers_401(api):
    server, visitor, made, _client = api
    for headers in ({}, {"Authorization": "Bearer bchat_nope"}, {"Authorization": made["token"]},
                    {"Cookie": visitor.cookie_header()}):  # the page's cookie alone
        status, h, raw = visitor.request("POST", "/v1/chat/completions",
                                         {"model": "tiny-chat",
                                          "messages": [{"role": "user", "content": "hi"}]},
                                         headers=headers)
        error = json.loads(raw)["error"]
        assert status == 401 and error["code"] == "invalid_api_key" and error["message"]
        assert h["WWW-Authenticate"].startswith("Bearer")


def test_keys_from_the_shell(app, capsys, monkeypatch, db_url):
    from webapp.cli import main

    monkeypatch.setenv("BCHAT_DATABASE_URL", db_url)
    assert main(["keys", "create", "--name", "ci", "--owner", "owner-1"]) == 0
    printed = capsys.readouterr().out.split()
    token, key_id = printed[-1], printed[1]
    keys = app.extensions["bchat"].keys
    assert keys.authenticate(token)["owner"] == "owner-1"
    assert main(["keys", "list"]) == 0
    assert key_id in capsys.readouterr().out
    assert main(["keys", "revoke", "--", key_id]) == 0  # an id may start with "-" (1 in 64)
    assert keys.authenticate(token) is None
    assert main(["keys", "revoke", "no-such-key"]) == 1


def test_v1_is_not_behind_the_passcode(make_app, make_live_server):
    server = make_live_server(make_app(PASSCODE="let me in", **LOOSE))
    keys = server.app.extensions["bchat"].keys
    _key, token = keys.create("someone", "ci")
    visitor = server.session()
    assert visitor.json("GET", "/api/conversations")[0] == 401  # the page's API is gated
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    # ... while the host check still applies
    status, _h, _b = visitor.request("GET", "/v1/models", headers={
        "Authorization": f"Bearer {token}", "Host": "evil.example"})
    assert status == 400


# -- completions ------------------------------------------------------------------------------


def test_completions_stream_and_not_and_are_stored_as_api_conversations(api):
    _server, visitor, _made, client = api
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "hello "},
                                             {"type": "text", "text": "there"}]}]
    whole = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12,
                                           temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    text = whole.choices[0].message.content
    assert text
    streamed, _calls, finish, usage = collect(client.chat.completions.create(
        model="tiny-chat", messages=messages, max_completion_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"some_future_field": 1}))
    assert streamed == text and finish == "length"
    assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12
    # both calls are conversations of the key's owner, tagged as API calls
    conversations = visitor.json("GET", "/api/conversations")[1]["conversations"]
    assert [c["source"] for c in conversations] == ["api", "api"]
    stored = visitor.json("GET", f"/api/conversations/{conversations[0]['id']}")[1]
    assert [m["role"] for m in stored["messages"]] == ["system", "user", "assistant"]
    assert stored["messages"][1]["content"] == "hello there"
    assert stored["messages"][2]["content"] == text and stored["messages"][2]["status"] == "complete"
    # "store": false leaves nothing behind
    client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=3, store=False)
    assert len(visitor.json("GET", "/api/conversations")[1]["conversations"]) == 2


def test_stop_strings_cut_the_reply(api):
    *_, client = api
    ask = {"model": "tiny-chat", "messages": [{"role": "user", "content": "go"}],
           "max_tokens": 30, "temperature": 0}
    text = client.chat.completions.create(**ask).choices[0].message.content
    stop = text[10:14]
    cut = text[: text.index(stop)]
    for stream in (False, True):
        reply = client.chat.completions.create(**ask, stop=[stop, "never seen"], stream=stream)
        if stream:
            content, _calls, finish, _usage = collect(reply)
        else:
            content, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert content == cut and finish == "stop"


def test_bad_values_are_400_with_openai_errors(api):
    *_, client = api
    user = [{"role": "user", "content": "hi"}]
    cases = [
        dict(messages=user, temperature=5),
        dict(messages=user, n=5),  # above BCHAT_MAX_N
        dict(messages=user, stop=["a", "b", "c", "d", "e"]),
        dict(messages=[{"role": "robot", "content": "hi"}]),
        dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AA=="}}]}]),
        dict(messages=user, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "no-such-type"}}}),
        dict(messages=user, response_format={"type": "xml"}),
        dict(messages=user, tools=[WEATHER_TOOL], tool_choice={"type": "function",
                                                               "function": {"name": "nope"}}),
        dict(messages=user, presence_penalty="high"),
    ]
    for case in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny-chat", max_tokens=2, **case)
        assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=user)


# -- structured outputs -----------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [1, 4], ids=["one-at-a-time", "batched"])
def test_nested_json_schema_on_the_tiny_model(make_app, make_live_server, parallel):
    server = make_live_server(make_app(PARALLEL=parallel, **LOOSE))
    _key, token = server.app.extensions["bchat"].keys.create("o", "ci")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0)
    validator = jsonschema_rs.validator_for(PERSON)
    for seed in range(4):
        reply = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "a person"}], seed=seed,
            temperature=1.0, max_tokens=400, response_format=person_format(), stream=seed % 2 == 1)
        if seed % 2:
            text, _calls, finish, _usage = collect(reply)
        else:
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert finish == "stop", text
        validator.validate(json.loads(text))
    # json_object: some JSON object (bounded here by a schema in llama-cpp-python's spelling)
    reply = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "json"}], max_tokens=200,
        response_format={"type": "json_object", "schema": {"type": "object", "properties": {
            "ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}})
    assert isinstance(json.loads(reply.choices[0].message.content)["ok"], bool)


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    legs: int = Field(ge=0, le=9)


class Owner(BaseModel):
    name: str = Field(max_length=8)  # bounded: a random-weight model never ends a string
    pets: list[Pet] = Field(max_length=2)


def test_parse_with_a_pydantic_model(api):
    *_, client = api
    for seed in range(3):
        completion = client.chat.completions.parse(
            model="tiny-chat", messages=[{"role": "user", "content": "an owner"}],
            response_format=Owner, max_tokens=300, temperature=1.0, seed=seed)
        owner = completion.choices[0].message.parsed
        assert isinstance(owner, Owner) and len(owner.pets) <= 2


# -- tool calls --------------------------------------------------------------------------------


def test_a_two_step_tool_loop(api):
    _server, visitor, _made, client = api
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="tiny-chat", messages=messages,
                                           tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
                                           max_tokens=150, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
    tool = WEATHER_TOOL if call.function.name == "get_weather" else TIME_TOOL
    jsonschema_rs.validator_for(tool["function"]["parameters"]).validate(
        json.loads(call.function.arguments))
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
    final = client.chat.completions.create(model="tiny-chat", messages=messages,
                                           tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="none",
                                           max_tokens=10, temperature=0)
    assert final.choices[0].finish_reason == "length" and final.choices[0].message.content
    assert not final.choices[0].message.tool_calls
    # the stored second call holds the whole loop, tool turns as text the page can show
    conversation = visitor.json("GET", "/api/conversations")[1]["conversations"][0]
    stored = visitor.json("GET", f"/api/conversations/{conversation['id']}")[1]["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1]["meta"]["openai"]["tool_calls"][0]["id"] == call.id
    assert "<tool_response>" in stored[2]["content"] and stored[2]["meta"]["openai"]["role"] == "tool"


def test_named_tool_streamed_as_deltas(api):
    *_, client = api
    content, calls, finish, _usage = collect(client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "time?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=150, temperature=0, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [c.function.name for c in calls] == ["get_time"]
    assert json.loads(calls[0].function.arguments)["zone"] in ("UTC", "CET")


def test_auto_tool_choice_is_text_or_a_valid_call(api):
    *_, client = api
    validator = jsonschema_rs.validator_for(WEATHER_TOOL["function"]["parameters"])
    for seed in range(4):
        reply = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "weather?"}],
            tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=150, temperature=1.0, seed=seed)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            validator.validate(json.loads(choice.message.tool_calls[0].function.arguments))
        else:
            assert not choice.message.content.lstrip().startswith("<")


# -- the batched worker keeps each request's constraint to itself ------------------------------


def test_batched_worker_four_requests_each_with_its_own_constraint(app):
    engine = app.extensions["bchat"].engines.engines[0]
    assert engine.parallel == 4
    other = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
             "required": ["ok", "n"], "additionalProperties": False}
    free = GenerationOptions(temperature=0, max_tokens=60)
    asks = [
        GenerationOptions.parse({"response_format": person_format(), "max_tokens": 400,
                                 "temperature": 0}),
        free,
        GenerationOptions.parse({"response_format": person_format(other), "max_tokens": 100,
                                 "temperature": 0}),
        free,
    ]
    messages = [[{"role": "user", "content": f"request {i}"}] for i in range(4)]

    def run(i: int, out: list) -> None:
        for chunk in streams[i]:
            if isinstance(chunk, Token):
                out.append(chunk.text)

    # Solo runs first: what each free-text request writes with nobody else in the batch.
    alone = {}
    for i in (1, 3):
        streams = {i: engine.stream("tiny-chat", messages[i], asks[i], threading.Event())}
        alone[i] = []
        run(i, alone[i])
    # All four queued before any is read, so the inference thread takes them in one batch.
    streams = {i: engine.stream("tiny-chat", messages[i], asks[i], threading.Event())
               for i in range(4)}
    outs = {i: [] for i in range(4)}
    threads = [threading.Thread(target=run, args=(i, outs[i])) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    jsonschema_rs.validator_for(PERSON).validate(json.loads("".join(outs[0])))
    jsonschema_rs.validator_for(other).validate(json.loads("".join(outs[2])))
    for i in (1, 3):
        assert "".join(outs[i]) == "".join(alone[i]), "a grammar leaked into a free-text slot"


# -- the pieces, directly ----------------------------------------------------------------------


def test_reasoning_and_tool_calls_are_split_from_the_text():
    assert split_reply("<think>\nhmm, 2+2</think>\n\nIt is 4.") == ("It is 4.", "hmm, 2+2", None)
    assert split_reply("plain <think>not at the start</think>") == (
        "plain <think>not at the start</think>", None, None)
    content, reasoning, calls = split_reply(
        '<think>use a tool</think><tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
        tools=True)
    assert content == "" and reasoning == "use a tool"
    assert calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    # a call cut short stays visible as text; without tools, the marker is just text
    assert split_reply('<tool_call>\n{"name": "f", "argu', tools=True)[0].startswith("<tool_call>")
    assert split_reply("<tool_call>x</tool_call>")[2] is None


def test_stop_matcher_holds_back_a_possible_stop_string():
    matcher = StopMatcher(("END", "STOP"))
    assert matcher.feed("abc E") == ("abc ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("x") == ("ENx", False)
    assert matcher.feed("..ST") == ("..", False)
    assert matcher.feed("OP and more") == ("", True)
    assert StopMatcher(()).feed("anything") == ("anything", False)


@pytest.mark.parametrize("parallel", [1, 4], ids=["one-at-a-time", "batched"])
def test_a_grammar_llama_cpp_refuses_fails_that_request_only(make_app, parallel):
    from webapp.engines.base import EngineError, Finished

    engine = make_app(PARALLEL=parallel).extensions["bchat"].engines.engines[0]
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(EngineError) as err:
        list(engine.stream("tiny-chat", user, GenerationOptions(grammar="root ::= nowhere"),
                           threading.Event()))
    assert err.value.code == "bad_grammar"
    after = list(engine.stream("tiny-chat", user, GenerationOptions(max_tokens=3, temperature=0),
                               threading.Event()))
    assert isinstance(after[-1], Finished) and after[-1].completion_tokens == 3
