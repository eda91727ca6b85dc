"""Issue 20: a large import is written in short transactions, invisible until whole, and never
costs another visitor a failed write. Real SQLite and PostgreSQL; waits on events only."""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from import_speed import export_file  # noqa: E402

from webapp.chats import IMPORTING_OWNER  # noqa: E402
from webapp.models import Conversation, utcnow  # noqa: E402


def branch(conversation: dict) -> list[str]:
    by_id = {m["id"]: m for m in conversation["messages"]}
    node, path = by_id.get(conversation["current_message_id"]), []
    while node is not None:
        path.append(node["content"])
        node = by_id.get(node["parent_id"])
    return path[::-1]


@pytest.mark.databases("sqlite", "postgresql")
def test_a_10000_message_import_is_exact_and_other_writes_all_succeed(app):
    size = 10_000
    data = export_file(size)
    importer, other = app.test_client(), app.test_client()
    conv_id = other.post("/api/conversations", json={"title": "meanwhile"}).get_json()["id"]
    importer.get("/")  # the importer's cookie, so its own listing can be watched meanwhile
    finished = threading.Event()
    statuses: Counter[int] = Counter()
    partial_sightings: list[int] = []

    def write_meanwhile() -> None:
        # Bounded: a visitor's few hundred posts, not a loop racing the import for the lock.
        for _ in range(200):
            if finished.is_set():
                break
            response = other.post(f"/api/conversations/{conv_id}/messages",
                                  json={"role": "user", "content": "still here"})
            statuses[response.status_code] += 1
            finished.wait(0.01)  # a visitor, not a GIL-bound loop starving the import's thread

    def watch_own_listing() -> None:
        """The importer never sees its new conversation half-written."""
        watcher = app.test_client()
        with importer.session_transaction() as cookie, watcher.session_transaction() as mine:
            mine.update(cookie)
        while not finished.is_set():
            for listed in watcher.get("/api/conversations").get_json()["conversations"]:
                count = len(watcher.get(f"/api/conversations/{listed['id']}").get_json()["messages"])
                if count != size:
                    partial_sightings.append(count)
            finished.wait(0.02)  # look often, without starving the import of the GIL

    threads = [threading.Thread(target=write_meanwhile), threading.Thread(target=watch_own_listing)]
    for t in threads:
        t.start()
    try:
        response = importer.post("/api/conversations/import", data=json.dumps(data),
                                 content_type="application/json")
    finally:
        finished.set()
        for t in threads:
            t.join()
    assert response.status_code == 201, response.get_data(as_text=True)[:500]
    assert statuses and set(statuses) == {201}, statuses
    assert partial_sightings == []

    stored = importer.get(f"/api/conversations/{response.get_json()['id']}").get_json()
    assert len(stored["messages"]) == size
    assert [m["content"] for m in stored["messages"]] == [m["content"] for m in data["messages"]]
    # The tree is the file's: each message's parent maps to the file's parent.
    file_id = {m["id"]: f["id"] for m, f in zip(stored["messages"], data["messages"], strict=True)}
    assert [file_id.get(m["parent_id"]) for m in stored["messages"]] == \
        [f["parent_id"] for f in data["messages"]]
    expected = {f["id"]: f for f in data["messages"]}
    want, node = [], expected[data["conversation"]["current_message_id"]]
    while node is not None:
        want.append(node["content"])
        node = expected.get(node["parent_id"])
    assert branch(stored) == want[::-1]
    assert file_id[stored["current_message_id"]] == data["conversation"]["current_message_id"]
    # The other visitor's conversation got every write it was answered 201 for.
    mine = other.get(f"/api/conversations/{conv_id}").get_json()
    assert len(mine["messages"]) == statuses[201]


@pytest.mark.databases("sqlite", "postgresql")
def test_an_import_a_crash_left_hidden_is_never_listed_and_is_swept(app, client):
    """A process killed mid-import leaves a conversation with no owner: nobody lists it, and
    the next import removes it once it is an hour old."""
    services = app.extensions["bchat"]
    with services.db.write() as session:
        session.add(Conversation(owner_id=f"{IMPORTING_OWNER}crashed", title="half",
                                 updated_at=utcnow() - timedelta(hours=2)))
        session.add(Conversation(owner_id=f"{IMPORTING_OWNER}running", title="in progress",
                                 updated_at=utcnow()))
    client.get("/")
    assert client.get("/api/conversations").get_json()["conversations"] == []
    response = client.post("/api/conversations/import", json=export_file(3))
    assert response.status_code == 201
    with services.db.read() as session:
        owners = sorted(c.owner_id for c in session.query(Conversation).all())
    assert f"{IMPORTING_OWNER}crashed" not in owners
    assert f"{IMPORTING_OWNER}running" in owners, "an import still running is left alone"
    listed = client.get("/api/conversations").get_json()["conversations"]
    assert [c["title"] for c in listed] == ["3 messages"]


def test_a_v1_file_imports_as_one_branch_in_chunks(client):
    """Version 1 files have no ids: the messages form one branch, across chunk borders."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
                for i in range(1203)]
    response = client.post("/api/conversations/import", json={
        "format": "bchat.conversation", "version": 1, "conversation": {"title": "flat"},
        "messages": messages})
    assert response.status_code == 201
    stored = response.get_json()
    assert branch(stored) == [m["content"] for m in messages]


def test_a_database_busy_past_its_timeout_is_a_503_with_retry_after(app, client, db_url):
    """Another process holding SQLite's write lock for longer than the busy timeout (10 s):
    the write waits it out, then answers 503 database_busy with Retry-After, not 500."""
    import sqlite3

    conv_id = client.post("/api/conversations", json={"title": "t"}).get_json()["id"]
    holder = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        response = client.post(f"/api/conversations/{conv_id}/messages",
                               json={"role": "user", "content": "blocked"})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "database_busy"
    assert int(response.headers["Retry-After"]) >= 1
    # Once the lock is free the same write goes through.
    response = client.post(f"/api/conversations/{conv_id}/messages",
                           json={"role": "user", "content": "free"})
    assert response.status_code == 201


@pytest.mark.parametrize("hold_s, most", [(1e-6, None), (60.0, 2)])
def test_an_imports_transactions_are_sized_by_the_time_they_hold_the_lock(
        app, client, monkeypatch, hold_s, most):
    """A slow machine gets smaller transactions (down to 25 rows), a fast one bigger ones;
    the tree comes out exact across every border, whatever the sizes."""
    import webapp.chats as chats_module

    monkeypatch.setattr(chats_module, "IMPORT_HOLD_S", hold_s)
    sizes: list[int] = []
    engine = app.extensions["bchat"].db.engine

    def executed(_conn, _cursor, statement, parameters, _context, many) -> None:
        if many and statement.startswith("INSERT INTO message"):
            sizes.append(len(parameters))

    data = export_file(1203)
    event.listen(engine, "before_cursor_execute", executed)
    try:
        response = client.post("/api/conversations/import", json=data)
    finally:
        event.remove(engine, "before_cursor_execute", executed)
    assert response.status_code == 201
    assert sum(sizes) == 1203 and sizes[0] == chats_module.IMPORT_CHUNK
    low, high = chats_module.IMPORT_CHUNK_RANGE
    if most is None:  # every transaction took longer than the (tiny) hold: the smallest size
        assert set(sizes[1:-1]) == {low}, sizes
    else:
        assert len(sizes) <= most and max(sizes) <= high, sizes
    stored = response.get_json()
    file_id = {m["id"]: f["id"] for m, f in zip(stored["messages"], data["messages"], strict=True)}
    assert [file_id.get(m["parent_id"]) for m in stored["messages"]] == \
        [f["parent_id"] for f in data["messages"]]
    assert branch(stored) and file_id[stored["current_message_id"]] == \
        data["conversation"]["current_message_id"]
