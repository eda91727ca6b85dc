"""Issue 20, the web parts: redirects, the last 500s, resume bursts, benchmark posts.

Each test here failed before the change it guards: a ``Location: //evil.example``, a 500 (an
import with an object for an id, a ``tool_choice`` whose function is a string, a ``localhost..``
Host), an ``internal`` error frame, a thread per resume frame, an unlimited benchmark post."""

from __future__ import annotations

import copy

import pytest

from webapp.security import same_site_path

# -- redirects only to same-site paths -------------------------------------------------------------

# Each of these is another site once a browser has dropped tabs and newlines and read
# backslashes as slashes (the WHATWG URL parser does both), or a header that cannot be sent.
OFF_SITE = [
    "https://evil.example/", "//evil.example/", "/\\evil.example", "\\\\evil.example",
    "/\t/evil.example", "/\n/evil.example", "/\r/x", "/\r\nSet-Cookie: a=b", "\t//evil.example",
    " //evil.example", "/ /evil.example", "/\\/evil.example", "/\x00/evil.example",
    "javascript:alert(1)", "evil.example", "", "/" + "a" * 3000,
]


@pytest.mark.parametrize("target", OFF_SITE)
def test_same_site_path_refuses_other_sites(target):
    assert same_site_path(target) == "/"


@pytest.mark.parametrize("target", ["/", "/c/abc", "/c/abc?x=1&y=%2F%2Fz", "/s/tok#frag", "/é"])
def test_same_site_path_keeps_our_paths(target):
    assert same_site_path(target) == target


@pytest.mark.parametrize("encoded", ["/%09/evil.example", "/%0d/x", "/%0a/evil.example",
                                     "/%5C/evil.example", "%2F%2Fevil.example", "/%0d%0aX:%20y"])
def test_passcode_next_cannot_leave_the_site(make_app, encoded):
    app = make_app(PASSCODE="p")
    app.testing = False  # a 500 is answered, as in production, instead of raised
    client = app.test_client()
    # before the passcode: the form keeps the target in a hidden field
    form = client.get(f"/passcode?next={encoded}")
    assert form.status_code == 200
    assert b'name="next" value="/"' in form.data
    entered = client.post(f"/passcode?next={encoded}", data={"passcode": "p"})
    assert entered.status_code == 303 and entered.headers["Location"] == "/"
    # after it: the page redirects at once
    again = client.get(f"/passcode?next={encoded}")
    assert again.status_code == 303 and again.headers["Location"] == "/"
    # a path of ours still goes through
    assert client.get("/passcode?next=/c/abc").headers["Location"] == "/c/abc"


# -- hosts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost..", ".localhost", "a..localhost", "localhost...",
                                  "x" * 64 + ".localhost", "localhost..:5000"])
def test_hosts_no_url_can_hold_get_400(make_app, host):
    app = make_app(ALLOWED_HOSTS=["*"])  # even "any host" means any *name*
    app.testing = False
    client = app.test_client()
    for path in ("/healthz", "/", "/api/conversations", "/nope"):
        response = client.get(path, headers={"Host": host})
        assert response.status_code == 400, (host, path)
        assert response.get_json()["error"]["code"] == "unknown_host"
    assert client.get("/healthz", headers={"Host": "localhost."}).status_code == 200


def test_localhost_dots_refused_with_the_default_hosts(make_app):
    app = make_app()
    app.testing = False
    response = app.test_client().get("/healthz", headers={"Host": "localhost.."})
    assert response.status_code == 400
    assert b"BCHAT_ALLOWED_HOSTS" in response.data


# -- imports: every malformed field is a 400 ----------------------------------------------------------

EXPORT_V2 = {
    "format": "bchat.conversation",
    "version": 2,
    "conversation": {"title": "imported", "created_at": "2026-01-02T03:04:05Z",
                     "settings": {"temperature": 0.5}, "current_message_id": "b"},
    "messages": [
        {"id": "a", "parent_id": None, "role": "user", "content": "hi",
         "created_at": "2026-01-02T03:04:05Z"},
        {"id": "b", "parent_id": "a", "role": "assistant", "content": "hello", "status": "complete",
         "engine": "server", "backend": "llamacpp", "model": "m", "tokens_per_second": 12.5,
         "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
         "meta": {"k": 1}, "created_at": "2026-01-02T03:04:06Z"},
    ],
}

# Where each value is put; every one of them is wrong there.
IMPORT_FIELDS = [
    ("format",), ("version",), ("conversation",), ("conversation", "title"),
    ("conversation", "created_at"), ("conversation", "settings"),
    ("conversation", "current_message_id"), ("messages",), ("messages", 1),
    ("messages", 1, "id"), ("messages", 1, "parent_id"), ("messages", 1, "role"),
    ("messages", 1, "content"), ("messages", 1, "status"), ("messages", 1, "engine"),
    ("messages", 1, "backend"), ("messages", 1, "model"), ("messages", 1, "tokens_per_second"),
    ("messages", 1, "finish_reason"), ("messages", 1, "usage"),
    ("messages", 1, "usage", "prompt_tokens"), ("messages", 1, "usage", "completion_tokens"),
    ("messages", 1, "meta"), ("messages", 1, "created_at"),
]
BAD_VALUES = [{}, {"a": 1}, [], ["a"], [{}], -1, 2**53, 1.5, True, "zz", "x" * 300,
              "2026-13-45", "\u0000"]
# Values that are fine in some fields: not malformed there.
ACCEPTED = {
    ("conversation", "title"): ["zz", "x" * 300, "2026-13-45"],
    ("conversation", "settings"): [{}],
    ("messages", 1, "content"): ["zz", "x" * 300, "2026-13-45"],
    ("messages", 1, "usage"): [{}, {"a": 1}, []],
    ("messages", 1, "meta"): [{}, {"a": 1}],
    ("messages", 1, "tokens_per_second"): [1.5],
    **{("messages", 1, name): ["zz", "2026-13-45"]
       for name in ("backend", "model", "finish_reason")},
}


def _with(path: tuple, value):
    data = copy.deepcopy(EXPORT_V2)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.databases("sqlite", "postgresql")
def test_every_malformed_import_field_gets_a_400(make_app):
    app = make_app()
    app.testing = False  # a 500 is answered, as in production, instead of raised
    client = app.test_client()
    assert client.post("/api/conversations/import", json=EXPORT_V2).status_code == 201
    wrong = []
    for path in IMPORT_FIELDS:
        for value in BAD_VALUES:
            response = client.post("/api/conversations/import", json=_with(path, value))
            accepted = value in ACCEPTED.get(path, [])
            if accepted and response.status_code == 201:
                continue
            body = response.get_json(silent=True) or {}
            code = (body.get("error") or {}).get("code")
            if accepted or response.status_code != 400 or not code:
                wrong.append((path, repr(value)[:20], response.status_code, code))
    assert not wrong, wrong
    # nothing half-written: only the valid imports made conversations
    made = len(client.get("/api/conversations").get_json()["conversations"])
    assert made == 1 + sum(len(values) for values in ACCEPTED.values())
