"""Property-based tests of the JSON API: any body, however odd, gets an answer below 500, and
a refused write leaves no row behind; an accepted one reads back as strict JSON.

Bodies are written with Python's lenient json.dumps (NaN, Infinity, integers of any size,
lone surrogates, deep nesting), which is what a hostile or buggy client can send.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 150

# Any text, surrogates (category Cs) included.
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=20)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    ANY_TEXT, st.sampled_from([2**53, -(2**53), 2**63, 10**400, "", " ", "\ud800", "2026-01-01T00:00:00Z",
                               "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"]),
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(ANY_TEXT, children, max_size=4)),
    max_leaves=20,
)
DEEP = st.integers(min_value=30, max_value=3000).map(lambda n: "[" * n + "]" * n)


def maybe(valid):
    """Mostly a valid value, sometimes anything at all."""
    return st.one_of(valid, valid, ANY_JSON)


MESSAGE = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["user", "assistant", "system"])), "content": maybe(st.text(max_size=30))},
    optional={
        "status": maybe(st.sampled_from(["complete", "stopped", "failed"])),
        "created_at": maybe(st.just("2026-01-02T03:04:05.000Z")),
        "engine": maybe(st.sampled_from(["server", "browser", None])),
        "tokens_per_second": maybe(st.floats(min_value=0, max_value=1e6)),
        "usage": maybe(st.fixed_dictionaries({"prompt_tokens": maybe(st.integers(0, 10_000))})),
        "meta": maybe(st.dictionaries(st.text(max_size=5), ANY_JSON, max_size=3)),
        "model": maybe(st.text(max_size=10)),
    },
)
EXPORT = st.fixed_dictionaries({
    "format": maybe(st.just("bchat.conversation")),
    "version": maybe(st.just(1)),
    "conversation": maybe(st.fixed_dictionaries(
        {"title": maybe(st.text(min_size=1, max_size=30))},
        optional={"created_at": maybe(st.just("2026-01-02T03:04:05Z"))},
    )),
    "messages": maybe(st.lists(MESSAGE, max_size=4)),
})
NEW_MESSAGE = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["user", "assistant"])), "content": maybe(st.text(max_size=30))},
    optional={
        "status": maybe(st.sampled_from(["complete", "stopped"])),
        "provenance": maybe(st.fixed_dictionaries({"engine": maybe(st.just("browser"))}, optional={
            "tokens_per_second": maybe(st.floats(min_value=0, max_value=1e6)),
            "prompt_tokens": maybe(st.integers(0, 10_000)),
            "meta": maybe(st.dictionaries(st.text(max_size=5), ANY_JSON, max_size=3)),
        })),
    },
)

PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                    HealthCheck.too_slow, HealthCheck.data_too_large])


def counts(app) -> tuple[int, int]:
    path = app.config["DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return (conn.execute("SELECT count(*) FROM conversation").fetchone()[0],
                conn.execute("SELECT count(*) FROM message").fetchone()[0])


def strict_json(raw: bytes):
    def refuse(name):
        raise AssertionError(f"the response holds {name}")
    return json.loads(raw, parse_constant=refuse)


def send(client, method, path, body):
    text = body if isinstance(body, str) else json.dumps(body)  # lenient on purpose
    # A raw lone surrogate goes out as the invalid UTF-8 a hostile client could send.
    data = text.encode("utf-8", "surrogatepass")
    return client.open(path, method=method, data=data, content_type="application/json")


@pytest.fixture
def owner(app):
    client = app.test_client()
    conv = client.post("/api/conversations", json={"title": "target"}).get_json()
    return client, conv["id"]


@PROPERTY_SETTINGS
@given(body=st.one_of(EXPORT, ANY_JSON, DEEP))
def test_import_any_body(app, owner, body):
    client, _ = owner
    before = counts(app)
    response = send(client, "POST", "/api/conversations/import", body)
    assert response.status_code < 500, response.data[:300]
    after = counts(app)
    if response.status_code == 201:
        created = strict_json(response.data)
        assert after == (before[0] + 1, before[1] + len(created["messages"]))
        strict_json(client.get(f"/api/conversations/{created['id']}").data)
    else:
        assert response.status_code in (400, 413), response.status_code
        assert strict_json(response.data)["error"]["code"]
        assert after == before, "a refused import left rows behind"


@PROPERTY_SETTINGS
@given(body=st.one_of(NEW_MESSAGE, ANY_JSON, DEEP))
def test_post_message_any_body(app, owner, body):
    client, conversation_id = owner
    before = counts(app)
    response = send(client, "POST", f"/api/conversations/{conversation_id}/messages", body)
    assert response.status_code < 500, response.data[:300]
    after = counts(app)
    if response.status_code == 201:
        assert after == (before[0], before[1] + 1)
    else:
        assert response.status_code == 400 and strict_json(response.data)["error"]["code"]
        assert after == before
    strict_json(client.get(f"/api/conversations/{conversation_id}").data)


@PROPERTY_SETTINGS
@given(body=st.one_of(st.fixed_dictionaries({"title": maybe(st.text(max_size=30))}), ANY_JSON))
def test_rename_any_body(app, owner, body):
    client, conversation_id = owner
    path = f"/api/conversations/{conversation_id}"
    before = strict_json(client.get(path).data)["title"]
    response = send(client, "PATCH", path, body)
    assert response.status_code < 500, response.data[:300]
    current = strict_json(client.get(path).data)["title"]
    if response.status_code == 200:
        assert current == strict_json(response.data)["title"]
    else:
        assert response.status_code == 400 and strict_json(response.data)["error"]["code"]
        assert current == before, "a refused rename changed the title"
