"""Issue 10, the parts off the reply path: strict JSON, hosts, passcode, caching, logs, 413.

Each test here failed before the change it guards (a 500, a 201 with NaN stored, a page served
to any Host, a full id in the exception log, a 400 where 413 belongs)."""

from __future__ import annotations

import http.client
import json
import logging
import sqlite3

import pytest

from webapp.errors import Invalid
from webapp.validation import check_text, parse_json_text

# What makes werkzeug route a request to the websocket rule (else it answers 400 mismatch).
WS_UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}

EXPORT = {
    "format": "bchat.conversation",
    "version": 1,
    "conversation": {"title": "imported", "created_at": "2026-01-02T03:04:05.000Z"},
    "messages": [
        {"role": "user", "content": "hi", "created_at": "2026-01-02T03:04:05.000Z"},
        {"role": "assistant", "content": "hello", "engine": "server", "tokens_per_second": 12.5,
         "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "meta": {"k": 1}},
    ],
}


def raw_request(client, method, path, text, **kwargs):
    return client.open(path, method=method, data=text, content_type="application/json", **kwargs)


def rows(app, table):
    url = app.config["DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(url) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# -- the parser itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ('{"a": NaN}', "bad_number"),
        ('{"a": -Infinity}', "bad_number"),
        ('{"a": 1e400}', "bad_number"),
        (f'{{"a": {2**70}}}', "bad_number"),
        (f'{{"a": {10**400}}}', "bad_number"),
        ('{"a": -9007199254740992}', "bad_number"),
        ('"\\ud800"', "bad_text"),
        ('{"\\udfff": 1}', "bad_text"),
        ("[" * 100_000 + "]" * 100_000, "too_deep"),
        ("[" * 33 + "]" * 33, "too_deep"),
        ("{'a': 1}", "bad_json"),
        ("", "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
    ],
)
def test_parse_json_text_refuses_with_a_code(text, code):
    with pytest.raises(Invalid) as caught:
        parse_json_text(text)
    assert caught.value.code == code


def test_parse_json_text_keeps_what_is_valid():
    text = '{"a": [1, -2.5, 9007199254740991, "\\ud83d\\ude00", null, true], "b": {}}'
    assert parse_json_text(text) == {"a": [1, -2.5, 2**53 - 1, "😀", None, True], "b": {}}
    assert parse_json_text("[" * 32 + "]" * 32) is not None
    with pytest.raises(Invalid) as caught:
        parse_json_text(b"[1, 2, 3]", max_bytes=5)
    assert caught.value.code == "too_large"
    assert check_text("fine ✓") == "fine ✓"
    with pytest.raises(Invalid):
        check_text("half \ud83d")


# -- the API: 400 with a code, never 500, nothing stored ----------------------------------------


def reply_with(provenance_field: str) -> str:
    """A browser reply whose provenance holds ``provenance_field``, raw JSON text."""
    head = '{"role": "assistant", "content": "x", "provenance": {"engine": "browser", '
    return head + provenance_field + "}}"


BAD_BODIES = [
    (reply_with('"meta": {"x": NaN}'), "bad_number"),
    (reply_with('"tokens_per_second": Infinity'), "bad_number"),
    (reply_with('"tokens_per_second": 1e999'), "bad_number"),
    (reply_with(f'"prompt_tokens": {2**70}'), "bad_number"),
    ('{"role": "user", "content": "lone \\udc00 surrogate"}', "bad_text"),
    ('{"role": "user", "content": "x", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}", "too_deep"),
]


@pytest.mark.parametrize(("text", "code"), BAD_BODIES)
def test_message_post_refuses_bad_json_without_storing(app, client, text, code):
    conv = client.post("/api/conversations", json={}).get_json()
    response = raw_request(client, "POST", f"/api/conversations/{conv['id']}/messages", text)
    assert response.status_code == 400, response.data[:200]
    assert response.get_json()["error"]["code"] == code
    assert rows(app, "message") == 0
    listing = client.get(f"/api/conversations/{conv['id']}")
    assert listing.status_code == 200 and b"NaN" not in listing.data and b"Infinity" not in listing.data


def test_title_patch_with_lone_surrogate_is_400(client):
    conv = client.post("/api/conversations", json={"title": "ok"}).get_json()
    response = raw_request(client, "PATCH", f"/api/conversations/{conv['id']}", '{"title": "\\ud800"}')
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "bad_text"
    assert client.get(f"/api/conversations/{conv['id']}").get_json()["title"] == "ok"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda e: e["messages"][1].update(tokens_per_second=float("nan")), "bad_number"),
        (lambda e: e["messages"][1].update(tokens_per_second=float("inf")), "bad_number"),
        (lambda e: e["messages"][1]["usage"].update(prompt_tokens=2**70), "bad_number"),
        (lambda e: e["messages"][1]["usage"].update(completion_tokens=10**400), "bad_number"),
        (lambda e: e["messages"][1].update(meta={"x": float("-inf")}), "bad_number"),
        (lambda e: e["messages"][0].update(content="\ud800"), "bad_text"),
        (lambda e: e["conversation"].update(title="t\udfff"), "bad_text"),
        (lambda e: e["messages"][0].update(created_at="0001-01-01T00:30:00+01:00"), "bad_import"),
        (lambda e: e["messages"][0].update(created_at="9999-12-31T23:59:59-01:00"), "bad_import"),
        (lambda e: e["conversation"].update(created_at="99999-01-01"), "bad_import"),
        (lambda e: e["conversation"].update(created_at=["2026-01-01"]), "bad_import"),
    ],
)
def test_import_refuses_bad_values_and_creates_nothing(app, client, change, code):
    export = json.loads(json.dumps(EXPORT))
    change(export)
    text = json.dumps(export)  # Python writes NaN/Infinity/huge ints/lone surrogates as asked
    response = raw_request(client, "POST", "/api/conversations/import", text)
    assert response.status_code == 400, response.data[:300]
    assert response.get_json()["error"]["code"] == code
    assert rows(app, "conversation") == 0 and rows(app, "message") == 0


def test_a_good_import_still_works(client):
    response = client.post("/api/conversations/import", json=EXPORT)
    assert response.status_code == 201
    messages = response.get_json()["messages"]
    assert [m["content"] for m in messages] == ["hi", "hello"]
    assert messages[1]["tokens_per_second"] == 12.5


def test_responses_never_write_nan(app):
    with app.app_context(), pytest.raises(ValueError):
        app.json.dumps({"x": float("nan")})


# -- body size: 413 for any body over the limit, chunked too ---------------------------------------


def test_oversized_bodies_get_413_also_when_chunked(make_app, make_live_server):
    server = make_live_server(make_app(MAX_UPLOAD_BYTES=1000))
    body = json.dumps({"title": "x" * 5000}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/api/conversations", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 413, response.read()[:200]
    response.read()
    conn.close()

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/api/conversations", body=iter([body[:600], body[600:]]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413, response.read()[:200]
    assert json.loads(response.read())["error"]["code"] == "request_entity_too_large"
    conn.close()


# -- hosts ------------------------------------------------------------------------------------------


def test_unknown_hosts_are_refused_before_anything_else(make_app):
    app = make_app()
    client = app.test_client()
    for host in ("localhost", "127.0.0.1:5000", "[::1]:8080", "LOCALHOST."):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:5000", "127.0.0.1.evil.example", "local host", ""):
        response = client.get("/api/conversations", headers={"Host": host})
        assert response.status_code == 400, host
        assert "Set-Cookie" not in response.headers, "no identity handed to a rebinding page"
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400
    # the websocket handshake goes through the same hook
    refused = client.get("/ws", headers={"Host": "evil.example", **WS_UPGRADE})
    assert refused.status_code == 400 and b"BCHAT_ALLOWED_HOSTS" in refused.data


def test_allowed_hosts_setting(make_app):
    client = make_app(ALLOWED_HOSTS=["chat.example.org", ".example.net"]).test_client()
    assert client.get("/healthz", headers={"Host": "chat.example.org"}).status_code == 200
    assert client.get("/healthz", headers={"Host": "a.example.net:443"}).status_code == 200
    assert client.get("/healthz", headers={"Host": "example.net"}).status_code == 200
    assert client.get("/healthz", headers={"Host": "example.org"}).status_code == 400
    anyone = make_app(ALLOWED_HOSTS=["*"]).test_client()
    assert anyone.get("/healthz", headers={"Host": "whatever.example"}).status_code == 200
    bound = make_app(BIND_HOST="192.168.1.7").test_client()
    assert bound.get("/healthz", headers={"Host": "192.168.1.7:5000"}).status_code == 200


# -- caching -----------------------------------------------------------------------------------------


def test_private_responses_are_not_cached(client):
    conv = client.post("/api/conversations", json={}).get_json()
    for path in ("/", f"/c/{conv['id']}", "/api/conversations", f"/api/conversations/{conv['id']}",
                 f"/api/conversations/{conv['id']}/export", "/api/conversations/nope"):
        response = client.get(path)
        assert response.headers.get("Cache-Control") == "private, no-store", path
    assert "no-store" not in client.get("/static/js/render.js").headers.get("Cache-Control", "")


# -- logs ----------------------------------------------------------------------------------------------


def test_exception_log_redacts_ids(app, client, caplog, monkeypatch):
    conv = client.post("/api/conversations", json={}).get_json()
    services = app.extensions["bchat"]

    def broken(*_args, **_kwargs):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(services.chats, "get_conversation", broken)
    app.testing = False  # let Flask log the exception and answer 500, as in production
    with caplog.at_level(logging.ERROR):
        response = client.get(f"/api/conversations/{conv['id']}")
    assert response.status_code == 500
    logged = "\n".join(caplog.text.splitlines())
    assert "Exception on /api/conversations/" in logged and "database on fire" in logged
    assert conv["id"] not in logged, "the full conversation id reached the log"
    assert f"/api/conversations/{conv['id'][:6]}…" in logged


# -- passcode --------------------------------------------------------------------------------------------


def test_passcode_gates_everything_but_share_links(make_app):
    app = make_app(PASSCODE="open sesame")
    owner_client = app.test_client()
    assert owner_client.get("/api/conversations").status_code == 401
    assert owner_client.get("/api/conversations").get_json()["error"]["code"] == "passcode_required"
    page = owner_client.get("/c/abc")
    assert page.status_code == 302 and "/passcode?next=/c/abc" in page.headers["Location"]
    assert "Set-Cookie" not in page.headers, "no identity before the passcode"
    assert owner_client.get("/ws", headers=WS_UPGRADE).status_code == 401
    assert owner_client.get("/healthz").status_code == 200
    assert owner_client.get("/passcode").status_code == 200

    wrong = owner_client.post("/passcode", data={"passcode": "open", "next": "/"})
    assert wrong.status_code == 403 and b"not the passcode" in wrong.data
    right = owner_client.post("/passcode", data={"passcode": "open sesame", "next": "/c/abc"})
    assert right.status_code == 303 and right.headers["Location"] == "/c/abc"
    conv = owner_client.post("/api/conversations", json={"title": "private"}).get_json()
    owner_client.post(f"/api/conversations/{conv['id']}/messages", json={"role": "user", "content": "hi"})
    link = owner_client.post(f"/api/conversations/{conv['id']}/share", json={}).get_json()["url"]
    path = link.split("localhost", 1)[1]

    # a visitor without the passcode reads the link; continuing asks for the passcode
    visitor = app.test_client()
    page = visitor.get(path)
    assert page.status_code == 200 and b"private" in page.data and b'name="passcode"' in page.data
    csrf = page.data.decode().split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert visitor.post(path + "/continue", data={"csrf": csrf, "passcode": "nope"}).status_code == 403
    assert visitor.get("/api/conversations").status_code == 401
    done = visitor.post(path + "/continue", data={"csrf": csrf, "passcode": "open sesame"})
    assert done.status_code == 303 and "/c/" in done.headers["Location"]
    assert len(visitor.get("/api/conversations").get_json()["conversations"]) == 1


def test_passcode_tries_are_limited_per_address(make_app):
    app = make_app(PASSCODE="right")
    clock = [1000.0]
    app.extensions["bchat.limits"].passcode_failures.clock = lambda: clock[0]
    client = app.test_client()
    for _ in range(5):
        assert client.post("/passcode", data={"passcode": "wrong"}).status_code == 403
    blocked = client.post("/passcode", data={"passcode": "right"})
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) == 60
    other = app.test_client()  # another client from the same address is blocked too
    assert other.post("/passcode", data={"passcode": "right"}).status_code == 429
    clock[0] += 61
    assert client.post("/passcode", data={"passcode": "right"}).status_code == 303
    assert client.get("/api/conversations").status_code == 200


def test_passcode_next_never_leaves_the_site(make_app):
    client = make_app(PASSCODE="p").test_client()
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example"):
        response = client.post("/passcode", data={"passcode": "p", "next": target})
        assert response.headers["Location"] == "/", target
        client = make_app(PASSCODE="p").test_client()


# -- bchat serve on a public address ----------------------------------------------------------------


def test_serve_on_a_public_address_without_passcode_warns(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "BCHAT_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}"}
    env.pop("BCHAT_PASSCODE", None)
    # an unmigrated database makes serve stop right after its checks, before listening
    public = subprocess.run([sys.executable, "-m", "webapp.cli", "serve", "--host", "0.0.0.0"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert public.returncode == 2
    assert "WARNING" in public.stderr and "BCHAT_PASSCODE" in public.stderr
    assert "BCHAT_ALLOWED_HOSTS" in public.stderr
    local = subprocess.run([sys.executable, "-m", "webapp.cli", "serve", "--host", "127.0.0.1"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert local.returncode == 2 and "WARNING" not in local.stderr
    guarded = subprocess.run([sys.executable, "-m", "webapp.cli", "serve", "--host", "0.0.0.0"],
                             env={**env, "BCHAT_PASSCODE": "x"}, capture_output=True, text=True, timeout=60)
    assert guarded.returncode == 2 and "WARNING" not in guarded.stderr
