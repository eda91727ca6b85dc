"""Conversations as trees: regenerate, edit, branches, continue, per-conversation settings,
export v2, shares of the current branch, and the migration of linear conversations."""

from __future__ import annotations

import sqlite3
from urllib.parse import urlsplit

import pytest

GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture
def recorded(live_server):
    """Every history the engine is asked to continue, in order."""
    engine = live_server.app.extensions["bchat"].engines.engines[0]
    real = engine.stream
    seen: list[list[dict]] = []

    def stream(model, messages, options, cancel, *args, **kwargs):
        seen.append([dict(m) for m in messages])
        return real(model, messages, options, cancel, *args, **kwargs)

    engine.stream = stream
    return seen


def turn(ws, frame: dict) -> tuple[dict, dict]:
    ws.send(frame)
    started, _ = ws.until("started")
    final, _ = ws.until("done", "error")
    return started, final


def conversation(visitor, conversation_id):
    status, body = visitor.json("GET", f"/api/conversations/{conversation_id}")
    assert status == 200
    return body


def test_regenerate_makes_siblings_that_never_see_each_other(live_server, recorded):
    visitor = live_server.session()
    ws = visitor.ws()
    started, first = turn(ws, {"type": "chat", "content": "ask once", "options": GREEDY})
    reply1 = first["message"]
    assert reply1["parent_id"] == started["user_message"]["id"]

    started2, second = turn(ws, {"type": "regenerate", "message_id": reply1["id"],
                                 "options": {"temperature": 0.9, "max_tokens": 6, "seed": 7}})
    reply2 = second["message"]
    assert started2["kind"] == "regenerate" and reply2["id"] != reply1["id"]
    assert reply2["parent_id"] == reply1["parent_id"], "a sibling under the same user message"
    assert reply2["meta"]["options"]["temperature"] == 0.9
    # The regenerated reply saw the path to the user message, not its sibling.
    assert recorded[-1] == [{"role": "user", "content": "ask once"}]

    conv = conversation(visitor, started["conversation_id"])
    assert conv["current_message_id"] == reply2["id"]
    assert [m["id"] for m in conv["messages"]] == [started["user_message"]["id"], reply1["id"], reply2["id"]]

    # Switch back to the first reply's branch; a new message continues from there.
    status, switched = visitor.json("PATCH", f"/api/conversations/{started['conversation_id']}",
                                    {"current_message_id": reply1["id"]})
    assert status == 200 and switched["current_message_id"] == reply1["id"]
    _s, third = turn(ws, {"type": "chat", "conversation_id": started["conversation_id"],
                          "content": "and then?", "options": GREEDY})
    assert recorded[-1][:2] == [{"role": "user", "content": "ask once"},
                                {"role": "assistant", "content": reply1["content"]}]
    assert third["message"]["parent_id"] == _s["user_message"]["id"]
    assert _s["user_message"]["parent_id"] == reply1["id"]
    ws.close()


def test_edit_is_a_new_user_message_beside_the_old_one(live_server, recorded):
    visitor = live_server.session()
    ws = visitor.ws()
    started, first = turn(ws, {"type": "chat", "content": "first question", "options": GREEDY})
    cid = started["conversation_id"]
    s2, _ = turn(ws, {"type": "chat", "conversation_id": cid, "content": "typo'd follow-up",
                      "options": GREEDY})
    # Edit the follow-up: same parent as the original (the first reply).
    s3, edited = turn(ws, {"type": "chat", "conversation_id": cid, "content": "fixed follow-up",
                           "parent_id": s2["user_message"]["parent_id"], "options": GREEDY})
    assert s3["user_message"]["parent_id"] == first["message"]["id"]
    assert recorded[-1][-1] == {"role": "user", "content": "fixed follow-up"}
    assert all(m["content"] != "typo'd follow-up" for m in recorded[-1])
    conv = conversation(visitor, cid)
    assert conv["current_message_id"] == edited["message"]["id"]
    assert len(conv["messages"]) == 6, "the old branch is still there"
    # Editing the very first message: a new root (parent_id null).
    s4, _ = turn(ws, {"type": "chat", "conversation_id": cid, "content": "another start",
                      "parent_id": None, "options": GREEDY})
    assert s4["user_message"]["parent_id"] is None
    assert recorded[-1] == [{"role": "user", "content": "another start"}]
    for bad, code in (({"parent_id": "nope"}, "not_found"), ({"parent_id": 5}, "bad_parent")):
        ws.send({"type": "chat", "conversation_id": cid, "content": "x", **bad})
        error, _ = ws.until("error")
        assert error["code"] == code
    ws.close()


def test_continue_extends_a_reply_cut_off_at_the_token_limit(live_server, recorded):
    visitor = live_server.session()
    ws = visitor.ws()
    started, first = turn(ws, {"type": "chat", "content": "go on and on",
                               "options": {"temperature": 0, "max_tokens": 8}})
    cut = first["message"]
    assert cut["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 8
    ws.send({"type": "continue", "message_id": cut["id"], "options": {"max_tokens": 8}})
    again, _ = ws.until("started")
    assert again["kind"] == "continue" and again["message_id"] == cut["id"]
    done, frames = ws.until("done")
    longer = done["message"]
    assert longer["id"] == cut["id"] and longer["content"].startswith(cut["content"])
    assert len(longer["content"]) > len(cut["content"])
    assert longer["usage"]["completion_tokens"] == 16 and longer["meta"]["continued"] == 1
    tokens = [f for f in frames if f["type"] == "token"]
    assert tokens[0]["offset"] == len(cut["content"]), "offsets go on from the text kept"
    assert recorded[-1][-1] == {"role": "assistant", "content": cut["content"]}
    conv = conversation(visitor, started["conversation_id"])
    assert len(conv["messages"]) == 2 and conv["messages"][1]["content"] == longer["content"]
    # A reply that ended by itself cannot be continued; nor can a user message.
    for message_id in (started["user_message"]["id"], "missing"):
        ws.send({"type": "continue", "message_id": message_id})
        error, _ = ws.until("error")
        assert error["code"] in ("not_continuable", "not_found")
    ws.close()


def test_settings_belong_to_the_conversation(live_server, recorded):
    visitor = live_server.session()
    ws = visitor.ws()
    a, _ = turn(ws, {"type": "chat", "content": "in A", "options": GREEDY})
    b, _ = turn(ws, {"type": "chat", "content": "in B", "options": GREEDY})
    status, changed = visitor.json("PATCH", f"/api/conversations/{a['conversation_id']}",
                                   {"settings": {"system": "You are a pirate.", "temperature": 0,
                                                 "max_tokens": 9}})
    assert status == 200 and changed["settings"]["system"] == "You are a pirate."
    _s, in_a = turn(ws, {"type": "chat", "conversation_id": a["conversation_id"], "content": "again"})
    assert in_a["message"]["meta"]["options"] == {"system": "You are a pirate.", "temperature": 0.0,
                                                  "top_p": 0.95, "max_tokens": 9, "seed": None}
    assert in_a["message"]["usage"]["completion_tokens"] == 9
    _s, in_b = turn(ws, {"type": "chat", "conversation_id": b["conversation_id"], "content": "again",
                         "options": {"temperature": 0, "max_tokens": 5}})
    assert in_b["message"]["meta"]["options"]["system"] is None, "A's prompt stays in A"
    assert conversation(visitor, b["conversation_id"])["settings"] == {}
    # A null removes a setting; bad values are refused and change nothing.
    assert visitor.json("PATCH", f"/api/conversations/{a['conversation_id']}",
                        {"settings": {"system": None}})[1]["settings"] == {"temperature": 0, "max_tokens": 9}
    for bad in ({"temperature": 9}, {"colour": "red"}, {"engine": "gpu"}, {"max_tokens": 10**9}):
        status, body = visitor.json("PATCH", f"/api/conversations/{a['conversation_id']}",
                                    {"settings": bad})
        assert status == 400 and body["error"]["code"] == "bad_settings"
    ws.close()


def test_new_conversations_start_from_the_visitors_defaults(live_server):
    visitor = live_server.session()
    visitor.visit()
    assert visitor.json("GET", "/api/defaults") == (200, {"settings": {}})
    status, body = visitor.json("PUT", "/api/defaults", {"settings": {"system": "Be brief.",
                                                                      "max_tokens": 7}})
    assert status == 200 and body["settings"] == {"system": "Be brief.", "max_tokens": 7}
    ws = visitor.ws()
    started, final = turn(ws, {"type": "chat", "content": "hello", "options": {"temperature": 0}})
    assert started["conversation"]["settings"] == {"system": "Be brief.", "max_tokens": 7}
    assert final["message"]["meta"]["options"]["system"] == "Be brief."
    assert final["message"]["usage"]["completion_tokens"] == 7
    # Another visitor's defaults are their own.
    other = live_server.session()
    other.visit()
    assert other.json("GET", "/api/defaults")[1] == {"settings": {}}
    ws.close()


def test_export_v2_round_trip_keeps_the_tree_and_v1_still_imports(live_server):
    visitor = live_server.session()
    ws = visitor.ws()
    started, first = turn(ws, {"type": "chat", "content": "root", "options": GREEDY})
    cid = started["conversation_id"]
    turn(ws, {"type": "regenerate", "message_id": first["message"]["id"], "options": GREEDY})
    turn(ws, {"type": "chat", "conversation_id": cid, "content": "deeper", "options": GREEDY})
    visitor.json("PATCH", f"/api/conversations/{cid}", {"settings": {"system": "S", "model": "tiny-chat"}})
    visitor.json("PATCH", f"/api/conversations/{cid}", {"current_message_id": first["message"]["id"]})
    exported = visitor.json("GET", f"/api/conversations/{cid}/export?format=json")[1]
    assert exported["version"] == 3 and len(exported["messages"]) == 5
    status, imported = visitor.json("POST", "/api/conversations/import", exported)
    assert status == 201
    again = visitor.json("GET", f"/api/conversations/{imported['id']}/export")[1]

    def shape(export):
        index = {m["id"]: i for i, m in enumerate(export["messages"])}
        messages = [{**{k: v for k, v in m.items() if k not in ("id", "parent_id")},
                     "parent": index.get(m["parent_id"])} for m in export["messages"]]
        conv = dict(export["conversation"])
        conv.pop("updated_at")  # an import is new: it goes to the top of the list
        conv["current"] = index[conv.pop("current_message_id")]
        return conv, messages

    assert shape(again) == shape(exported)
    assert shape(exported)[0]["current"] == 1 and shape(exported)[0]["settings"]["system"] == "S"

    v1 = {"format": "bchat.conversation", "version": 1, "conversation": {"title": "old file"},
          "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}]}
    status, old = visitor.json("POST", "/api/conversations/import", v1)
    assert status == 201
    parents = [m["parent_id"] for m in old["messages"]]
    assert parents == [None, old["messages"][0]["id"], old["messages"][1]["id"]]
    assert old["current_message_id"] == old["messages"][2]["id"]
    for bad in ({"id": "x", "parent_id": "later"}, {"id": 5}):
        broken = {**exported, "messages": [{**exported["messages"][0], **bad}]}
        status, body = visitor.json("POST", "/api/conversations/import", broken)
        assert status == 400 and body["error"]["code"] == "bad_import"
    ws.close()


def test_a_share_snapshots_the_current_branch_with_its_settings(live_server):
    visitor = live_server.session()
    ws = visitor.ws()
    started, first = turn(ws, {"type": "chat", "content": "share me", "options": GREEDY})
    cid = started["conversation_id"]
    _s, second = turn(ws, {"type": "regenerate", "message_id": first["message"]["id"], "options": GREEDY})
    visitor.json("PATCH", f"/api/conversations/{cid}", {"settings": {"system": "Shared prompt"}})
    visitor.json("PATCH", f"/api/conversations/{cid}", {"current_message_id": first["message"]["id"]})
    status, share = visitor.json("POST", f"/api/conversations/{cid}/share", {})
    assert status == 200 and share["messages"] == 2
    shares = live_server.app.extensions["bchat"].shares
    token = urlsplit(share["url"]).path.rsplit("/", 1)[1]
    snapshot = shares.lookup(token)
    assert [m["id"] for m in snapshot["messages"]] == [started["user_message"]["id"],
                                                      first["message"]["id"]]
    assert second["message"]["id"] not in [m["id"] for m in snapshot["messages"]]
    assert snapshot["conversation"]["settings"] == {"system": "Shared prompt"}
    # Continue: the copy is that branch, with the settings.
    copy = shares.continue_as(token, "stranger-owner")
    assert [m["content"] for m in copy["messages"]] == ["share me", first["message"]["content"]]
    assert copy["settings"] == {"system": "Shared prompt"}
    assert copy["current_message_id"] == copy["messages"][1]["id"]
    ws.close()


def test_browser_engine_messages_take_a_parent_too(live_server):
    visitor = live_server.session()
    visitor.visit()
    cid = visitor.json("POST", "/api/conversations", {})[1]["id"]
    path = f"/api/conversations/{cid}/messages"
    _s, user = visitor.json("POST", path, {"role": "user", "content": "q"})
    _s, a1 = visitor.json("POST", path, {"role": "assistant", "content": "one",
                                         "provenance": {"engine": "browser"}})
    _s, a2 = visitor.json("POST", path, {"role": "assistant", "content": "two", "parent_id": user["id"],
                                         "provenance": {"engine": "browser"}})
    assert a1["parent_id"] == a2["parent_id"] == user["id"]
    conv = conversation(visitor, cid)
    assert conv["current_message_id"] == a2["id"]


def test_migration_backfills_linear_conversations_as_one_branch(tmp_path):
    from alembic import command

    from webapp.db import alembic_config

    db_file = tmp_path / "v1.sqlite3"
    url = f"sqlite:///{db_file}"
    command.upgrade(alembic_config(url), "0005")
    with sqlite3.connect(db_file) as conn:
        conn.execute("INSERT INTO conversation (id, public_id, owner_id, title, created_at, updated_at)"
                     " VALUES (1, 'c1', 'o', 't', '2026-01-01', '2026-01-01'),"
                     " (2, 'c2', 'o', 'empty', '2026-01-01', '2026-01-01')")
        for i, role in enumerate(["user", "assistant", "user", "assistant"], start=1):
            conn.execute("INSERT INTO message (id, public_id, conversation_id, role, content, status,"
                         " created_at, stop_requested) VALUES (?, ?, 1, ?, 'x', 'complete',"
                         " '2026-01-01', 0)", (i * 10, f"m{i}", role))
    command.upgrade(alembic_config(url), "head")
    with sqlite3.connect(db_file) as conn:
        parents = conn.execute("SELECT id, parent_id FROM message ORDER BY id").fetchall()
        current = conn.execute("SELECT id, current_message_id FROM conversation ORDER BY id").fetchall()
    assert parents == [(10, None), (20, 10), (30, 20), (40, 30)]
    assert current == [(1, 40), (2, None)]
