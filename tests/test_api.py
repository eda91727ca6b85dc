"""The JSON API: conversations, owner isolation, posted messages, headers."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.databases("sqlite", "postgresql")


def owner(live_server):
    visitor = live_server.session()
    visitor.visit()
    return visitor


def test_healthz_and_models(client):
    assert client.get("/healthz").get_json() == {"status": "ok", "models": 1, "runs": 0}
    body = client.get("/api/models").get_json()
    assert body["default"] == "tiny-chat"
    (model,) = body["models"]
    assert model["id"] == "tiny-chat" and model["engines"] == ["server", "browser"]
    assert model["browser"]["url"].startswith("/models/tiny-chat/")
    assert model["browser"]["size"] == model["facts"]["file_size"]
    assert model["facts"]["architecture"] == "llama"
    assert model["facts"]["quantization"] == "F32"
    assert model["facts"]["context_length"] == 4096


def test_owner_cookie_is_signed_httponly_lax(client):
    response = client.get("/")
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("bchat=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Expires=" in cookie  # survives a browser restart


def test_chat_page_headers_isolate_and_restrict(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    for testid in ("composer", "send", "stop", "model-select", "new-chat"):
        assert f'data-testid="{testid}"'.encode() in response.data


def test_conversation_crud_newest_first(live_server):
    visitor = owner(live_server)
    _, first = visitor.json("POST", "/api/conversations", {"title": "first"})
    _, second = visitor.json("POST", "/api/conversations", {"title": "second"})
    status, listing = visitor.json("GET", "/api/conversations")
    assert status == 200
    assert [c["id"] for c in listing["conversations"]] == [second["id"], first["id"]]
    status, renamed = visitor.json("PATCH", f"/api/conversations/{first['id']}", {"title": "  new   name "})
    assert status == 200 and renamed["title"] == "new name"
    assert visitor.json("GET", "/api/conversations")[1]["conversations"][0]["id"] == first["id"]
    status, _ = visitor.json("DELETE", f"/api/conversations/{first['id']}")
    assert status == 204
    assert visitor.json("GET", f"/api/conversations/{first['id']}")[0] == 404


def test_conversations_are_private_to_their_owner(live_server):
    alice, bob = owner(live_server), owner(live_server)
    _, conv = alice.json("POST", "/api/conversations", {"title": "alice's"})
    path = f"/api/conversations/{conv['id']}"
    assert bob.json("GET", path)[0] == 404
    assert bob.json("PATCH", path, {"title": "pwned"})[0] == 404
    assert bob.json("DELETE", path)[0] == 404
    assert bob.json("POST", path + "/messages", {"role": "user", "content": "hi"})[0] == 404
    assert bob.json("GET", "/api/conversations")[1]["conversations"] == []
    assert alice.json("GET", path)[1]["title"] == "alice's"


def test_public_ids_are_random_not_sequential(live_server):
    visitor = owner(live_server)
    ids = [visitor.json("POST", "/api/conversations", {})[1]["id"] for _ in range(3)]
    assert len(set(ids)) == 3 and all(len(i) >= 16 and not i.isdigit() for i in ids)


def test_writes_need_a_json_body(live_server):
    visitor = owner(live_server)
    status, headers, raw = visitor.request(
        "POST", "/api/conversations", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 415 and b"json_required" in raw


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"role": "system", "content": "obey"}, "bad_role"),
        ({"role": "wizard", "content": "x"}, "bad_role"),
        ({"role": "user", "content": "x" * 40_000}, "content_too_long"),
        ({"role": "user", "content": ""}, "empty_content"),
        ({"role": "assistant", "content": "x", "status": "weird",
          "provenance": {"engine": "browser"}}, "bad_status"),
        ({"role": "assistant", "content": "x", "provenance": {"engine": "server"}}, "bad_engine"),
        ({"role": "assistant", "content": "x",
          "provenance": {"engine": "browser", "completion_tokens": -1}}, "bad_provenance"),
        ({"role": "assistant", "content": "x",
          "provenance": {"engine": "browser", "secret": 1}}, "bad_provenance"),
    ],
)
def test_posted_messages_are_validated(live_server, body, code):
    visitor = owner(live_server)
    _, conv = visitor.json("POST", "/api/conversations", {})
    status, error = visitor.json("POST", f"/api/conversations/{conv['id']}/messages", body)
    assert status == 400 and error["error"]["code"] == code
    assert visitor.json("GET", f"/api/conversations/{conv['id']}")[1]["messages"] == []


def test_posted_browser_reply_is_stored_with_provenance(live_server):
    visitor = owner(live_server)
    _, conv = visitor.json("POST", "/api/conversations", {})
    path = f"/api/conversations/{conv['id']}/messages"
    assert visitor.json("POST", path, {"role": "user", "content": "hi"})[0] == 201
    status, reply = visitor.json("POST", path, {
        "role": "assistant", "content": "partial", "status": "stopped",
        "provenance": {"engine": "browser", "backend": "wasm-st", "model": "tiny-chat",
                       "prompt_tokens": 9, "completion_tokens": 3, "tokens_per_second": 7.5},
    })
    assert status == 201
    assert reply["status"] == "stopped" and reply["backend"] == "wasm-st"
    assert reply["usage"] == {"prompt_tokens": 9, "completion_tokens": 3}
    stored = visitor.json("GET", f"/api/conversations/{conv['id']}")[1]["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == "hi"


def test_a_settled_browser_reply_reopens_only_to_be_continued(live_server):
    """Continue in the page: a cut-off reply goes back to streaming with text that starts with
    what it holds, and settles again; anything else about a settled reply stays refused."""
    visitor = owner(live_server)
    _, conv = visitor.json("POST", "/api/conversations", {})
    path = f"/api/conversations/{conv['id']}/messages"
    visitor.json("POST", path, {"role": "user", "content": "hi"})
    _, reply = visitor.json("POST", path, {"role": "assistant", "content": "Once upon", "status": "complete",
                                           "provenance": {"engine": "browser", "finish_reason": "length"}})
    one = f"{path}/{reply['id']}"
    for body in ({"content": "Twice upon", "status": "streaming", "continue": True},  # not its text
                 {"content": "Once upon", "status": "streaming"},  # a late flush: not asked to reopen
                 {"content": "Once upon a time", "status": "complete"}):  # settled: not reopened
        status, error = visitor.json("PATCH", one, body)
        assert (status, error["error"]["code"]) == (409, "already_final")
    reopen = {"content": "Once upon a", "status": "streaming", "continue": True}
    assert visitor.json("PATCH", one, reopen)[0] == 200
    status, done = visitor.json("PATCH", one, {"content": "Once upon a time", "status": "complete"})
    assert status == 200 and done["content"] == "Once upon a time" and done["id"] == reply["id"]
    _, failed = visitor.json("POST", path, {"role": "assistant", "content": "x", "status": "failed",
                                            "provenance": {"engine": "browser"}})
    status, _ = visitor.json("PATCH", f"{path}/{failed['id']}",
                             {"content": "x y", "status": "streaming", "continue": True})
    assert status == 409, "a failed reply is regenerated, not continued"


def test_model_fit_is_judged_for_the_settings_the_server_runs(make_app):
    client = make_app(N_CTX=1024, PARALLEL=2).test_client()
    (model,) = client.get("/api/models").get_json()["models"]
    fit = model["facts"]["fits_server"]
    assert fit["n_ctx"] == 1024 and fit["parallel"] == 2
    assert fit["memory_needed"] >= model["facts"]["file_size"]


def test_the_cookie_is_sent_again_once_a_day_not_on_every_answer(client, monkeypatch):
    """Its 400 days count from the last day of use (the cookie is the visitor's identity),
    but an unchanged session is not re-signed and re-sent on every answer."""
    from webapp import security

    first = client.get("/")
    assert first.headers["Set-Cookie"].startswith("bchat=")
    client.post("/api/conversations", json={}, headers={"Origin": "http://localhost"})
    same_day = client.get("/api/conversations")
    assert same_day.status_code == 200 and "Set-Cookie" not in same_day.headers
    assert "Cookie" in same_day.headers["Vary"]
    monkeypatch.setattr(security, "utc_today", lambda: "2999-01-01")
    next_day = client.get("/api/conversations")
    sent = next_day.headers["Set-Cookie"]
    assert sent.startswith("bchat=") and "Expires=" in sent
    assert next_day.get_json() == same_day.get_json(), "the same visitor, the same conversations"
    assert "Set-Cookie" not in client.get("/api/conversations").headers
