"""Keyset pages of the conversation list and of search (webapp/paging.py), and appends whose
cost does not grow with the conversation: on SQLite and PostgreSQL."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime

import pytest
from sqlalchemy import event, update

from webapp.models import Conversation, Message, Provenance

pytestmark = pytest.mark.databases("sqlite", "postgresql")


def walk(client, path: str, key: str, limit: int, between=None) -> list[list[str]]:
    """Every page of ``path`` (ids per page), calling ``between()`` after each page."""
    pages, cursor = [], None
    while True:
        query = f"{path}{'&' if '?' in path else '?'}limit={limit}"
        response = client.get(query + (f"&cursor={cursor}" if cursor else ""))
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        ids = [item["id" if key == "conversations" else "conversation_id"] for item in body[key]]
        assert len(ids) <= limit
        pages.append(ids)
        cursor = body["next"]
        if cursor is None:
            return pages
        assert ids, "a page with a next cursor is never empty"
        if between:
            between()


def test_list_pages_have_no_duplicates_or_gaps_while_conversations_are_added(client):
    before = [client.post("/api/conversations", json={"title": f"c{i}"}).get_json()["id"]
              for i in range(23)]
    added: list[str] = []

    def add_two() -> None:
        for _ in range(2):
            added.append(client.post("/api/conversations", json={"title": "new"}).get_json()["id"])

    pages = walk(client, "/api/conversations", "conversations", 5, add_two)
    seen = [cid for page in pages for cid in page]
    assert len(seen) == len(set(seen)), "no conversation twice"
    assert seen == before[::-1], "every conversation there before, newest first, none added since"
    assert added and [len(p) for p in pages] == [5, 5, 5, 5, 3]
    # Without limit: everything at once, as before paging; next is null.
    body = client.get("/api/conversations").get_json()
    assert len(body["conversations"]) == 23 + len(added) and body["next"] is None


def test_conversations_active_at_the_same_instant_page_by_their_public_id(app, client):
    ids = [client.post("/api/conversations", json={}).get_json()["id"] for _ in range(9)]
    with app.extensions["bchat"].db.write() as session:  # one updated_at for all: ties
        session.execute(update(Conversation).where(Conversation.public_id.in_(ids))
                        .values(updated_at=datetime(2026, 1, 2, 3, 4, 5, 678901)))
    pages = walk(client, "/api/conversations", "conversations", 4)
    seen = [cid for page in pages for cid in page]
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert seen == sorted(ids, reverse=True)


@pytest.mark.parametrize("query, code", [
    ("limit=0", "bad_limit"), ("limit=201", "bad_limit"), ("limit=x", "bad_limit"),
    ("limit=-1", "bad_limit"), ("limit=2&cursor=!!", "bad_cursor"),
    ("limit=2&cursor=12.ab.cd", "bad_cursor"), ("limit=2&cursor=999999999999999999.ab", "bad_cursor"),
])
def test_a_bad_limit_or_cursor_is_a_400(client, query, code):
    for path in ("/api/conversations", "/api/search?q=x"):
        response = client.get(f"{path}{'&' if '?' in path else '?'}{query}")
        assert response.status_code == 400 and response.get_json()["error"]["code"] == code


def test_search_pages_have_no_duplicates_or_gaps_while_matches_are_added(client):
    def conversation(text: str) -> str:
        conv = client.post("/api/conversations", json={}).get_json()["id"]
        assert client.post(f"/api/conversations/{conv}/messages",
                           json={"role": "user", "content": text}).status_code == 201
        return conv

    matching = [conversation(f"the needle number {i}") for i in range(11)]
    conversation("nothing to see here")
    titled = client.post("/api/conversations", json={"title": "needles in the title"}).get_json()["id"]
    pages = walk(client, "/api/search?q=needle", "results", 4,
                 lambda: conversation("another needle, added meanwhile"))
    seen = [cid for page in pages for cid in page]
    assert seen == [titled, *matching[::-1]], "newest first, each once, none added since"
    first = client.get("/api/search?q=needle&limit=4").get_json()["results"]
    assert all("needle" in hit["snippet"] for hit in first if hit["message_id"])


@contextmanager
def counting_loads():
    """How many message rows the ORM builds meanwhile."""
    loads: list[int] = []

    def loaded(target, _context) -> None:
        loads.append(target.id)

    event.listen(Message, "load", loaded)
    try:
        yield loads
    finally:
        event.remove(Message, "load", loaded)


def test_an_append_reads_the_same_few_rows_however_long_the_conversation(app):
    chats = app.extensions["bchat"].chats
    conv, _ = chats.add_user_message("someone", None, "the first question")
    for turn in range(40):
        chats.add_reply("someone", conv["id"], f"answer {turn}", "complete",
                        Provenance(engine="browser"))
        chats.add_user_message("someone", conv["id"], f"question {turn}")
    with counting_loads() as loads:
        chats.add_user_message("someone", conv["id"], "one more")
        chats.add_reply("someone", conv["id"], "and its answer", "complete",
                        Provenance(engine="browser"))
    assert len(loads) <= 4, f"read {len(loads)} messages to append two"
    # A reply a model writes reads the branch it sees, never the side branch beside it.
    side = chats.add_user_message("someone", conv["id"], "a side question", parent_id=None)[1]
    for turn in range(10):
        chats.add_reply("someone", conv["id"], f"side answer {turn}", "complete",
                        Provenance(engine="browser"))
        chats.add_user_message("someone", conv["id"], f"side {turn}")
    with counting_loads() as loads:
        _, user, replies, history = chats.begin_turn(
            "someone", conv["id"], "on the side branch", [Provenance(engine="server")],
            run_owner="nobody")
    assert [turn["content"] for turn in history][:3] == ["a side question", "side answer 0",
                                                         "side 0"]
    # 21 turns: the new question stands for the unanswered "side 9" (model_history).
    assert len(history) == 21 and len(loads) <= 22, f"read {len(loads)} for a 22-message branch"
    assert user["parent_id"] and replies[0]["parent_id"] == user["id"] and side["parent_id"] is None


@contextmanager
def counting_statements(app):
    """The SQL statements the app's engine runs meanwhile (BEGIN/COMMIT are not statements)."""
    engine = app.extensions["bchat"].db.engine
    statements: list[str] = []

    def executed(_conn, _cursor, statement, _params, _context, _many) -> None:
        if not statement.startswith("BEGIN"):  # SQLite's explicit BEGIN (db.py)
            statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", executed)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", executed)


def test_a_list_page_is_one_query_with_its_shared_flags(app, client):
    """The sidebar's page is the most frequent read of a class: one statement, whatever the
    number of conversations or shares (it was two sessions: the page, then every share)."""
    ids = [client.post("/api/conversations", json={"title": f"c{i}"}).get_json()["id"]
           for i in range(6)]
    for shared in ids[1:3]:
        client.post(f"/api/conversations/{shared}/messages", json={"role": "user", "content": "hi"})
        assert client.post(f"/api/conversations/{shared}/share", json={}).status_code in (200, 201)
    with counting_statements(app) as statements:
        body = client.get("/api/conversations?limit=4").get_json()
    assert len(statements) == 1, statements
    flags = {c["id"]: c["shared"] for c in body["conversations"]}
    assert len(flags) == 4 and flags[ids[1]] is True and flags[ids[2]] is True
    assert flags[ids[5]] is False and flags[ids[4]] is False


def test_an_append_locks_its_conversation_row_before_it_inserts(app, client, db_backend):
    """Every writer takes the conversation's row first (the SELECT of it … FOR NO KEY
    UPDATE, the lock its UPDATE would take, before the message's INSERT): inserted first, the
    message's key-share lock, a share's SELECT … FOR UPDATE and then the UPDATE deadlocked
    on PostgreSQL (test_postgres's four processes of writers). SQLite has no row locks: its
    BEGIN IMMEDIATE has queued every writer already."""
    conv = client.post("/api/conversations", json={"title": "order"}).get_json()["id"]
    path = f"/api/conversations/{conv}/messages"
    for body in ({"role": "user", "content": "why?"},
                 {"role": "assistant", "content": "because", "status": "complete",
                  "provenance": {"engine": "browser"}}):
        with counting_statements(app) as statements:
            assert client.post(path, json=body).status_code == 201
        inserted = next(i for i, s in enumerate(statements) if s.startswith("INSERT INTO message"))
        if db_backend == "postgresql":
            assert any(s.startswith("SELECT") and "FROM conversation" in s
                       and "FOR NO KEY UPDATE" in s for s in statements[:inserted]), statements
        assert statements[inserted + 1:] == [s for s in statements[inserted + 1:]
                                             if s.startswith("UPDATE conversation")], \
            "after the INSERT, only the conversation's own UPDATE (current message, time)"
    opened = client.get(f"/api/conversations/{conv}?limit=10").get_json()
    assert [m["content"] for m in opened["messages"]] == ["why?", "because"]
    assert opened["current_message_id"] == opened["messages"][-1]["id"]
