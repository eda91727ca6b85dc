"""Share links, snapshots, continuing, revoking, export and import: a real app on a real socket,
an owner and a visitor with separate cookie jars."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time

import pytest
from conftest import migrate
from helpers import HttpSession
from sqlalchemy import inspect, text

from webapp.db import make_engine

pytestmark = pytest.mark.databases("sqlite", "postgresql")

GREEDY = {"temperature": 0, "max_tokens": 8}


def chat(session: HttpSession, content: str, conversation_id: str | None = None) -> str:
    ws = session.ws()
    ws.chat(content, conversation_id, options=GREEDY)
    started, _ = ws.until("started")
    ws.until("done")
    ws.close()
    return started["conversation_id"]


def token_of(url: str) -> str:
    return url.rsplit("/s/", 1)[1]


def test_share_snapshot_continue_revoke(live_server):
    owner, visitor = live_server.session(), live_server.session()
    conv = chat(owner, "What is a **snapshot**?")
    status, share = owner.json("POST", f"/api/conversations/{conv}/share", {})
    assert status == 200
    path = share["url"].replace(live_server.url, "")
    assert path.startswith("/s/")

    # the visitor reads the snapshot, without the owner's cookie
    status, headers, page = visitor.request("GET", path)
    assert status == 200
    assert "What is a **snapshot**?" in page.decode()
    assert 'data-testid="composer"' not in page.decode() and "/ws" not in page.decode()

    # the owner adds a message: the visitor still sees the old snapshot
    chat(owner, "A later question", conv)
    page = visitor.request("GET", path)[2].decode()
    assert "A later question" not in page
    assert page.count('data-testid="message"') == 2

    # the visitor continues: a copy of their own, opened for chatting
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    status, copy_conv = visitor.continue_share(path, csrf)
    assert status == 303
    copy_id = copy_conv
    status, copy = visitor.json("GET", f"/api/conversations/{copy_id}")
    assert status == 200 and copy_id != conv
    assert [m["content"] for m in copy["messages"]][0] == "What is a **snapshot**?"
    assert len(copy["messages"]) == 2
    assert copy["messages"][1]["engine"] == "server", "provenance is copied too"
    assert owner.json("GET", f"/api/conversations/{copy_id}")[0] == 404, "the owner cannot see it"
    assert visitor.json("GET", f"/api/conversations/{conv}")[0] == 404
    chat(visitor, "my own follow-up", copy_id)
    assert len(owner.json("GET", f"/api/conversations/{conv}")[1]["messages"]) == 4, "original untouched"
    assert len(visitor.json("GET", f"/api/conversations/{copy_id}")[1]["messages"]) == 4

    # the owner revokes: the link is gone for everyone
    assert owner.json("DELETE", f"/api/conversations/{conv}/share")[0] == 204
    assert visitor.request("GET", path)[0] == 404
    assert visitor.continue_share(path, csrf)[0] == 404


def test_continue_needs_the_visitors_own_form_token(live_server):
    owner, visitor, attacker = (live_server.session() for _ in range(3))
    conv = chat(owner, "hello")
    path = owner.json("POST", f"/api/conversations/{conv}/share", {})[1]["url"].replace(live_server.url, "")
    attacker_page = attacker.request("GET", path)[2].decode()
    attacker_csrf = re.search(r'name="csrf" value="([^"]+)"', attacker_page).group(1)
    visitor.visit()
    assert visitor.continue_share(path, attacker_csrf)[0] == 403, "a token made for someone else"
    assert visitor.continue_share(path, "")[0] == 403
    assert visitor.json("GET", "/api/conversations")[1]["conversations"] == []


def test_sharing_again_keeps_the_link_and_refreshes_the_snapshot(live_server):
    owner = live_server.session()
    conv = chat(owner, "first")
    first = owner.json("POST", f"/api/conversations/{conv}/share", {})[1]
    chat(owner, "second", conv)
    again = owner.json("POST", f"/api/conversations/{conv}/share", {})[1]
    assert again["url"] == first["url"] and again["messages"] == 4
    page = owner.request("GET", again["url"].replace(live_server.url, ""))[2].decode()
    assert "second" in page
    renewed = owner.json("POST", f"/api/conversations/{conv}/share", {"new_link": True})[1]
    assert renewed["url"] != first["url"]
    assert owner.request("GET", first["url"].replace(live_server.url, ""))[0] == 404
    assert owner.request("GET", renewed["url"].replace(live_server.url, ""))[0] == 200
    listing = owner.json("GET", "/api/shares")[1]["shares"]
    assert [s["url"] for s in listing] == [renewed["url"]]
    conversations = owner.json("GET", "/api/conversations")[1]["conversations"]
    assert conversations[0]["shared"] is True


def test_shared_page_headers_and_previews(live_server):
    owner = live_server.session()
    conv = chat(owner, "Explain <b>tags</b> & entities in one line")
    share = owner.json("POST", f"/api/conversations/{conv}/share", {})[1]
    status, headers, body = live_server.session().request("GET", share["url"].replace(live_server.url, ""))
    page = body.decode()
    assert status == 200
    assert headers["X-Robots-Tag"] == "noindex, nofollow"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    assert '<meta property="og:title" content="Explain &lt;b&gt;tags&lt;/b&gt; &amp; entities' in page
    assert '<meta name="description" content="Explain &lt;b&gt;tags' in page
    assert "<b>tags</b>" not in page, "everything from the conversation is escaped"
    # provenance: engine, backend, model, quantisation, speed
    provenance = re.search(r'data-testid="provenance">(.*?)</div>', page, re.S).group(1)
    assert "server (llamacpp)" in provenance and "tiny-chat" in provenance
    assert "F32" in provenance and "tok/s" in provenance


def test_unknown_tokens_are_404(live_server):
    visitor = live_server.session()
    assert visitor.request("GET", "/s/" + "A" * 43)[0] == 404
    assert visitor.request("GET", "/s/short")[0] == 404


def test_tokens_are_long_random_and_only_hashed_at_rest(make_app, make_live_server, db_url):
    server = make_live_server(make_app())
    owner = server.session()
    tokens = []
    for i in range(5):
        conv = chat(owner, f"conversation {i}")
        tokens.append(token_of(owner.json("POST", f"/api/conversations/{conv}/share", {})[1]["url"]))
    assert len(set(tokens)) == 5
    for token in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token), "token_urlsafe(32): 256 bits"
    alphabet = set("".join(tokens))
    assert len(alphabet) > 40, "spread over the whole urlsafe alphabet"
    engine = make_engine(db_url)
    try:
        with engine.connect() as db:
            rows = db.execute(text("SELECT token_hash, token_sealed, snapshot FROM share")).all()
            dump = "\n".join(  # every row of every table, as text
                repr(row) for table in inspect(db).get_table_names()
                for row in db.execute(text(f'SELECT * FROM "{table}"'))
            )
    finally:
        engine.dispose()
    assert {r[0] for r in rows} == {hashlib.sha256(t.encode()).hexdigest() for t in tokens}
    for token in tokens:
        assert token not in dump, "the token itself is nowhere in the database"


def test_deleting_the_conversation_keeps_the_share_until_revoked(live_server):
    owner, visitor = live_server.session(), live_server.session()
    conv = chat(owner, "keep me shared")
    share = owner.json("POST", f"/api/conversations/{conv}/share", {})[1]
    path = share["url"].replace(live_server.url, "")
    assert owner.json("DELETE", f"/api/conversations/{conv}")[0] == 204
    assert visitor.request("GET", path)[0] == 200, "the snapshot is a copy"
    (listed,) = owner.json("GET", "/api/shares")[1]["shares"]
    assert listed["conversation_exists"] is False
    assert visitor.json("DELETE", f"/api/shares/{listed['id']}")[0] == 404, "only the owner revokes"
    assert owner.json("DELETE", f"/api/shares/{listed['id']}")[0] == 204
    assert visitor.request("GET", path)[0] == 404


def test_only_the_owner_shares_or_revokes(live_server):
    owner, other = live_server.session(), live_server.session()
    conv = chat(owner, "mine")
    other.visit()
    assert other.json("POST", f"/api/conversations/{conv}/share", {})[0] == 404
    owner.json("POST", f"/api/conversations/{conv}/share", {})
    assert other.json("DELETE", f"/api/conversations/{conv}/share")[0] == 404
    assert other.json("GET", "/api/shares")[1]["shares"] == []
    assert other.request("GET", f"/api/conversations/{conv}/export")[0] == 404


def test_export_import_round_trip_is_lossless(live_server):
    owner = live_server.session()
    conv = chat(owner, "Round *trip* with `code`")
    chat(owner, "second turn", conv)
    # a browser-engine reply with its own provenance, and a stopped one
    owner.json("POST", f"/api/conversations/{conv}/messages", {"role": "user", "content": "third"})
    owner.json("POST", f"/api/conversations/{conv}/messages", {
        "role": "assistant", "content": "part", "status": "stopped",
        "provenance": {"engine": "browser", "backend": "wasm-mt", "model": "tiny-chat",
                       "prompt_tokens": 30, "completion_tokens": 2, "tokens_per_second": 9.5,
                       "finish_reason": "stopped", "meta": {"threads": 2}}})
    status, headers, raw = owner.request("GET", f"/api/conversations/{conv}/export?format=json")
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    exported = json.loads(raw)
    status, imported = owner.json("POST", "/api/conversations/import", exported)
    assert status == 201 and imported["id"] != conv
    again = json.loads(owner.request("GET", f"/api/conversations/{imported['id']}/export")[2])

    def strip(messages):
        """Ids are new on import; the tree's shape (each message's parent, by position) stays."""
        position = {m["id"]: i for i, m in enumerate(messages)}
        return [{**{k: v for k, v in m.items() if k not in ("id", "parent_id")},
                 "parent": position.get(m["parent_id"])} for m in messages]

    assert strip(again["messages"]) == strip(exported["messages"])
    assert [m["parent"] for m in strip(exported["messages"])] == [None, 0, 1, 2, 3, 4]
    assert again["conversation"]["title"] == exported["conversation"]["title"]
    assert again["conversation"]["created_at"] == exported["conversation"]["created_at"]
    assert len(exported["messages"]) == 6

    status, headers, markdown = owner.request("GET", f"/api/conversations/{conv}/export?format=markdown")
    text = markdown.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/markdown")
    assert text.startswith("# Round *trip* with `code`")
    assert "## User" in text and "## Assistant" in text and "browser · wasm-mt · tiny-chat" in text
    assert "stopped" in text


def test_bad_imports_create_nothing(live_server):
    owner = live_server.session()
    owner.visit()
    good = {"format": "bchat.conversation", "version": 1,
            "conversation": {"title": "t", "created_at": "2026-01-01T00:00:00.000Z"},
            "messages": [{"role": "user", "content": "hi"}]}
    bad_cases = [
        ({"format": "something else"}, "not a bchat conversation export"),
        ({**good, "version": 99}, "version"),
        ({**good, "messages": "nope"}, "messages"),
        ({**good, "messages": [{"role": "root", "content": "x"}]}, "messages[0].role"),
        ({**good, "messages": [{"role": "user", "content": "x"}, {"role": "user"}]}, "messages[1].content"),
        ({**good, "messages": [{"role": "assistant", "content": "x", "status": "weird"}]}, "status"),
        ({**good, "messages": [{"role": "assistant", "content": "x",
                                "usage": {"completion_tokens": -3}}]}, "completion_tokens"),
        ({**good, "messages": [{"role": "user", "content": "x", "created_at": "yesterday"}]}, "created_at"),
        ({**good, "conversation": {"title": ""}}, "title"),
    ]
    for body, where in bad_cases:
        status, error = owner.json("POST", "/api/conversations/import", body)
        assert status == 400, body
        assert error["error"]["code"] == "bad_import" and where in error["error"]["message"]
    status, _h, _b = owner.request(
        "POST", "/api/conversations/import", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert owner.json("GET", "/api/conversations")[1]["conversations"] == []
    assert owner.json("POST", "/api/conversations/import", good)[0] == 201


def test_ids_and_tokens_never_appear_in_full_in_the_server_log(tmp_path, tiny_model):
    """`bchat serve` as a user runs it; its request log is read back."""
    import os
    import socket

    url = f"sqlite:///{tmp_path / 'log.sqlite3'}"
    migrate(url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BCHAT_DATABASE_URL": url, "BCHAT_MODEL_PATH": str(tiny_model),
           "BCHAT_SECRET_KEY": "log-test", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "webapp.cli", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        owner = HttpSession(f"http://127.0.0.1:{port}")
        deadline = time.time() + 30
        while True:
            try:
                if owner.request("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        conv = chat(owner, "secret plans")
        share = owner.json("POST", f"/api/conversations/{conv}/share", {})[1]
        token = token_of(share["url"])
        owner.request("GET", f"/s/{token}")
        owner.request("GET", f"/c/{conv}")
        owner.request("GET", f"/api/conversations/{conv}/export")
    finally:
        proc.terminate()
        log = proc.communicate(timeout=20)[0]
    assert f"/s/{token[:6]}…" in log and f"/api/conversations/{conv[:6]}…" in log
    assert token not in log and conv not in log
