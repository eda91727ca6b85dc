"""Hostile JSON schemas (response_format and tools) against the real app and the tiny model.

Three schemas from issue 20 crashed, exhausted or stalled the server: a pattern repeated
100,000 times (a 700 KB grammar, SIGSEGV in llama.cpp's parser), maxLength 1e9 (21 GB) and
nested repetition (a 37 s stall of every other chat). They and everything a generator makes
of the same kind must now be refused, with a code, before reaching native code, in the same
words on the socket, on /v1 and in the page's settings; what passes must never cost other
chats more than a moment."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webapp.engines.base import EngineError, Finished
from webapp.engines.structured import (
    MAX_AMBIGUITY,
    MAX_ENUM,
    MAX_PATTERN_POSITIONS,
    MAX_REF_DEPTH,
    MAX_REPEAT,
    SchemaError,
    build_grammar,
    check_response_format,
    check_tools,
    pattern_ambiguity,
)
from webapp.errors import Invalid
from webapp.options import GenerationOptions

LOOSE = {"MAX_QUEUED_PER_VISITOR": 64, "RATE_LIMIT": "100000/minute"}
USER = [{"role": "user", "content": "hi"}]
FINDINGS = {
    "huge pattern repetition": ({"type": "string", "pattern": "^a{0,100000}$"}, "1000"),
    "huge maxLength": ({"type": "string", "maxLength": 1000000000}, "maxLength"),
    "nested repetition": ({"type": "string", "pattern": "^((a{0,50}){0,50}){0,50}$"},
                          "nested repetition"),
}
NORMAL = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130}}}


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def refusal(schema) -> str | None:
    """GenerationOptions' verdict: None when accepted, else the message."""
    try:
        GenerationOptions.parse({"response_format": schema_format(schema), "max_tokens": 8})
    except Invalid as exc:
        assert exc.code == "bad_options"
        return exc.message
    return None


# -- the checks themselves ---------------------------------------------------------------------


@pytest.mark.parametrize("name", FINDINGS)
def test_the_findings_are_refused_naming_the_limit(name):
    schema, words = FINDINGS[name]
    message = refusal(schema)
    assert message is not None and words in message
    # the same as a json_object's schema and as a tool's parameters
    with pytest.raises(SchemaError, match=words):
        check_response_format({"type": "json_object", "schema": schema})
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": schema}}}}
    with pytest.raises(SchemaError, match=words):
        check_tools([tool], "auto")


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "^(a{0,50}){0,50}$"}, "ways at once"),
    ({"type": "string", "pattern": "^.{0,500}.{0,500}$"}, "ways at once"),
    ({"type": "string", "pattern": "^(?=a)$"}, "(?"),
    ({"type": "string", "pattern": "no anchors"}, "start with ^"),
    ({"type": "string", "pattern": "^a{5,2}$"}, "backwards"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": MAX_REPEAT + 1}, "maxItems"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength is above"),
    ({"enum": list(range(MAX_ENUM + 1))}, "enum"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(200)}},
     "properties"),
    ({"anyOf": [{"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
                for _ in range(MAX_AMBIGUITY + 1)]}, "ways at once"),
    ({"anyOf": [{"type": "array", "items": {"$ref": "#"}}] * 2}, "recurses"),
    ({"$ref": "#/nowhere"}, "points at nothing"),
    ({"$ref": "https://example.com/s.json"}, "not a local reference"),
    ({"type": "string", "enum": ["x" * 2000]}, "characters as JSON"),
])
def test_limits_are_refused_with_their_name(schema, words):
    message = refusal(schema)
    assert message is not None and words in message


def test_many_large_tools_are_refused_as_a_whole():
    params = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 400}
                                               for i in range(100)}}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": params}}
             for i in range(5)]
    check_tools(tools[:1], "auto")
    with pytest.raises(SchemaError, match="the tools are"):
        check_tools(tools, "auto")


def test_deep_nesting_and_ref_chains_are_refused():
    deep = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    assert "nest more than" in refusal(deep)
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(MAX_REF_DEPTH + 2)}
    defs[f"d{MAX_REF_DEPTH + 2}"] = {"type": "string"}
    assert "$refs lead through" in refusal({"$defs": defs, "type": "object",
                                           "properties": {"x": {"$ref": "#/$defs/d0"}}})


@pytest.mark.parametrize("schema", [
    NORMAL,
    {"type": "string", "maxLength": MAX_REPEAT},
    {"type": "string", "pattern": f"^a{{0,{MAX_REPEAT}}}$"},
    {"type": "string", "pattern": r"^[a-z0-9._%+-]+@[a-z0-9-]+[.][a-z]{2,}$"},
    {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
    {"anyOf": [{"type": "string"}, {"type": "null"}]},
    {"anyOf": [{"type": "object", "properties": {"kind": {"const": f"k{i}"}},
                "required": ["kind"]} for i in range(40)]},
    {"type": "array", "items": {"type": "array", "items": {"type": "string", "maxLength": 100},
                                "maxItems": 100}, "maxItems": 100},
])
def test_ordinary_schemas_pass_and_compile(schema):
    assert refusal(schema) is None
    assert build_grammar(check_response_format(schema_format(schema)), None, None)


def test_pattern_ambiguity_counts_the_ways_a_text_can_match():
    assert pattern_ambiguity("^a{0,1000}$") == 1
    assert pattern_ambiguity("^(a|ab)(c|bcd)$") == 3  # after "a": ab's b, c, bcd's b
    assert pattern_ambiguity("^a{0,3}a{0,3}$") == 4
    with pytest.raises(SchemaError, match=str(MAX_PATTERN_POSITIONS)):
        pattern_ambiguity("^((a{0,20}){0,20}){0,20}$")


# -- one verdict: socket, /v1, the page's settings ---------------------------------------------


@pytest.fixture
def served(make_app, make_live_server):
    server = make_live_server(make_app(**LOOSE))
    visitor = server.session()
    visitor.visit()
    status, body = visitor.json("POST", "/api/keys", {"name": "tests"})
    assert status == 201
    return server, visitor, body["token"]


def v1(visitor, token, **body):
    import json

    status, _h, raw = visitor.request(
        "POST", "/v1/chat/completions",
        {"model": "tiny-chat", "messages": USER, "max_tokens": 4, **body},
        headers={"Authorization": f"Bearer {token}"})
    return status, json.loads(raw)


@pytest.mark.parametrize("name", [*FINDINGS, "normal"])
def test_one_verdict_on_the_socket_v1_and_the_settings(served, name):
    server, visitor, token = served
    schema, words = FINDINGS.get(name, (NORMAL, None))
    expected = refusal(schema)
    ws = visitor.ws()
    try:
        ws.chat("hi", options={"response_format": schema_format(schema), "max_tokens": 4})
        frame, _ = ws.until("done", "error")
    finally:
        ws.close()
    status, body = v1(visitor, token, response_format=schema_format(schema))
    if expected is None:
        assert frame["type"] == "done" and status == 200
        return
    assert words in expected
    assert frame["type"] == "error" and frame["code"] == "bad_options"
    assert frame["message"] == expected
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == expected
    # the page's reply-format editor saves through the conversation's settings
    ws = visitor.ws()
    try:
        ws.chat("hi", options={"max_tokens": 2})
        _done, frames = ws.until("done")
    finally:
        ws.close()
    conversation = next(f for f in frames if f["type"] == "started")["conversation_id"]
    status, body = visitor.json("PATCH", f"/api/conversations/{conversation}",
                                {"settings": {"response_format": schema_format(schema)}})
    assert status == 400 and body["error"]["code"] == "bad_settings"
    assert body["error"]["message"] == expected


# -- generated schemas, hostile ones among them ------------------------------------------------

big = st.integers(0, 10**9)
bounds = st.one_of(st.integers(0, 8), big)
regex_piece = st.sampled_from(["a", "b", ".", "[a-z]", r"\d", "(a|ab)", "(a?)", "(a*)", "x"])


@st.composite
def patterns(draw):
    """Regular expressions with repetition, nested repetition included."""
    body = draw(regex_piece)
    for _ in range(draw(st.integers(0, 3))):
        low = draw(st.integers(0, 60))
        high = draw(st.one_of(st.none(), st.integers(low, 200_000)))
        quantifier = draw(st.sampled_from(["*", "+", "?", f"{{{low}}}",
                                           f"{{{low},{'' if high is None else high}}}"]))
        body = f"({body}){quantifier}" if draw(st.booleans()) else body + quantifier
        if draw(st.booleans()):
            body += draw(regex_piece)
    return f"^{body}$"


leaves = st.one_of(
    st.just({"type": "string"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, bounds),
    st.builds(lambda n: {"type": "string", "minLength": n}, bounds),
    st.builds(lambda p: {"type": "string", "pattern": p}, patterns()),
    st.builds(lambda a, b: {"type": "integer", "minimum": a, "maximum": a + b},
              st.integers(-10**20, 10**20), st.integers(0, 10**20)),
    st.builds(lambda n: {"enum": [f"v{i}" for i in range(n)]}, st.sampled_from([1, 3, 300])),
    st.builds(lambda n: {"const": "c" * n}, st.sampled_from([1, 5000])),
    st.just({"$ref": "#"}),
    st.just({}),
)


def branches(children):
    return st.one_of(
        st.builds(lambda item, low, high: {"type": "array", "items": item, "minItems": low,
                                           "maxItems": high}, children, bounds, bounds),
        st.builds(lambda props, req: {"type": "object", "properties": props,
                                      "required": list(props)[:req]},
                  st.dictionaries(st.sampled_from(["a", "b", "c", "kind", "x" * 50]), children,
                                  max_size=4), st.integers(0, 4)),
        st.builds(lambda alts: {"anyOf": alts}, st.lists(children, min_size=1, max_size=6)),
        st.builds(lambda alts, n: {"anyOf": alts * n}, st.lists(children, min_size=1,
                                                                 max_size=2), st.integers(1, 40)),
    )


schemas = st.recursive(leaves, branches, max_leaves=12)

HOSTILE_SETTINGS = settings(max_examples=25, deadline=None, database=None,
                            suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow])


def test_generated_schemas_never_break_the_server_or_stall_a_chat(make_app):
    app = make_app(**LOOSE)
    services = app.extensions["bchat"]
    visitor = app.test_client()
    visitor.get("/")
    token = visitor.post("/api/keys", json={"name": "t"}).get_json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    # An ordinary chat runs over and over beside the hostile ones; each must finish.
    stop, finished, failures = threading.Event(), [], []
    progress = threading.Condition()  # notified each time the ordinary chat ends
    engine = services.engines.engines[0]

    def ordinary():
        while not stop.is_set():
            chunks = list(engine.stream("tiny-chat", USER, GenerationOptions(max_tokens=4),
                                        threading.Event()))
            with progress:
                if isinstance(chunks[-1], Finished) and chunks[-1].completion_tokens > 0:
                    finished.append(time.monotonic())
                else:
                    failures.append(chunks[-1])
                progress.notify_all()

    beside = threading.Thread(target=ordinary, daemon=True)
    beside.start()
    seen = {"refused": 0, "answered": 0}

    @HOSTILE_SETTINGS
    @given(schema=schemas, as_tool=st.booleans())
    def attempt(schema, as_tool):
        if as_tool:
            body = {"tools": [{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object", "properties": {"v": schema},
                                            "required": ["v"]}}}], "tool_choice": "required"}
        else:
            body = {"response_format": schema_format(schema)}
        began = len(finished)
        response = visitor.post("/v1/chat/completions", headers=auth, json={
            "model": "tiny-chat", "messages": USER, "max_tokens": 6, "store": False, **body})
        assert response.status_code < 500, response.get_data(as_text=True)[:300]
        if response.status_code >= 400:
            error = response.get_json()["error"]
            assert error["code"] and error["message"]
            seen["refused"] += 1
        else:
            seen["answered"] += 1
        # the ordinary chat beside it still finishes (a generous wait: a fact, not a speed)
        with progress:
            progress.wait_for(lambda: len(finished) > began, timeout=60)
        assert len(finished) > began, "an ordinary chat did not finish beside a schema"

    try:
        attempt()
    finally:
        stop.set()
        beside.join(60)
    assert not failures and seen["refused"] and seen["answered"]


# -- a grammar that is slow anyway: the slot fails, the batch goes on -------------------------


def test_a_slot_whose_grammar_is_too_slow_fails_and_the_others_go_on(make_app):
    engine = make_app(PARALLEL=4).extensions["bchat"].engines.engines[0]
    worker = engine.worker("tiny-chat")
    worker.wait_loaded()
    worker.grammar_token_seconds = 0.0  # every grammar is "too slow" for this worker
    schema = GenerationOptions.parse({"response_format": schema_format(NORMAL), "max_tokens": 50})
    results: dict[str, object] = {}

    def constrained():
        try:
            results["schema"] = list(engine.stream("tiny-chat", USER, schema, threading.Event()))
        except EngineError as exc:
            results["schema"] = exc

    thread = threading.Thread(target=constrained)
    thread.start()
    plain = list(engine.stream("tiny-chat", USER, GenerationOptions(max_tokens=20, temperature=0),
                               threading.Event()))
    thread.join(60)
    assert isinstance(results["schema"], EngineError)
    assert results["schema"].code == "grammar_too_slow"
    assert "simplify the schema" in results["schema"].message
    assert isinstance(plain[-1], Finished) and plain[-1].completion_tokens == 20
    # and the worker serves the next chat
    after = list(engine.stream("tiny-chat", USER, GenerationOptions(max_tokens=3), threading.Event()))
    assert isinstance(after[-1], Finished)


def test_grammar_too_slow_is_an_error_frame_and_a_400_on_v1(make_app, make_live_server):
    app = make_app(PARALLEL=4, **LOOSE)
    engine = app.extensions["bchat"].engines.engines[0]
    engine.worker("tiny-chat").grammar_token_seconds = 0.0
    server = make_live_server(app)
    visitor = server.session()
    ws = visitor.ws()
    try:
        ws.chat("hi", options={"response_format": schema_format(NORMAL), "max_tokens": 20})
        frame, _ = ws.until("error", "done")
    finally:
        ws.close()
    assert frame["type"] == "error" and frame["code"] == "grammar_too_slow"
    token = visitor.json("POST", "/api/keys", {"name": "t"})[1]["token"]
    status, body = v1(visitor, token, response_format=schema_format(NORMAL))
    assert status == 400 and body["error"]["code"] == "grammar_too_slow"


def test_the_watchdog_sees_a_slow_batch(make_app, monkeypatch):
    from webapp.engines import batched

    engine = make_app(PARALLEL=4, N_CTX=4096).extensions["bchat"].engines.engines[0]
    worker = engine.worker("tiny-chat")
    worker.wait_loaded()
    assert worker.health(1.0) is None
    # Every step counts as slow: a chat that runs over a second is then a slow batch.
    monkeypatch.setattr(batched, "SLOW_STEP_SECONDS", 0.0)
    cancel = threading.Event()
    problems = []
    for _chunk in engine.stream("tiny-chat", USER, GenerationOptions(max_tokens=3000, temperature=0),
                                cancel):
        problem = worker.health(0.2)  # "stuck" on a busy machine is possible, and not the point
        if problem and problem["problem"] == "slow":
            problems.append(problem)
            cancel.set()
    assert problems, "a batch whose every step was slow for 0.2 s was not reported"
    assert "slow" in problems[0]["message"]
    monkeypatch.setattr(batched, "SLOW_STEP_SECONDS", 2.0)
    list(engine.stream("tiny-chat", USER, GenerationOptions(max_tokens=3), threading.Event()))
    assert worker.health(1.0) is None
