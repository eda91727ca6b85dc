"""Windows of a long conversation (GET /api/conversations/<id>?limit=&before=): the current
branch's last messages, the pages above them, and a sibling's branch, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from test_paging import counting_loads

from webapp.models import Provenance

pytestmark = pytest.mark.databases("sqlite", "postgresql")
OWNER = "someone"


@pytest.fixture
def client(client):
    """The test client as OWNER, whose conversations the tests write through the service."""
    with client.session_transaction() as cookie:
        cookie["owner"] = OWNER
    return client


def long_conversation(chats, turns: int) -> str:
    """A conversation of ``turns`` questions and answers (2 * turns messages, one branch)."""
    conv, _ = chats.add_user_message(OWNER, None, "question 0")
    for turn in range(turns):
        chats.add_reply(OWNER, conv["id"], f"answer {turn}", "complete", Provenance(engine="browser"))
        if turn + 1 < turns:
            chats.add_user_message(OWNER, conv["id"], f"question {turn + 1}")
    return conv["id"]


def branch_of(body: dict) -> list[str]:
    """The branch a window shows: up from current_message_id through the messages sent."""
    by_id = {m["id"]: m for m in body["messages"]}
    path, node = [], by_id.get(body["current_message_id"])
    while node is not None:
        path.append(node["id"])
        node = by_id.get(node["parent_id"])
    return path[::-1]


def walk_up(client, conversation_id: str, limit: int, first: dict | None = None) -> list[list[dict]]:
    """Every window from the leaf up to the root: each window's branch messages, oldest first."""
    body = first or client.get(f"/api/conversations/{conversation_id}?limit={limit}").get_json()
    windows = []
    while True:
        by_id = {m["id"]: m for m in body["messages"]}
        # the window's branch: from its newest message up (the page above ends at `before`)
        bottom = body["current_message_id"] if not windows else windows[-1][0]["parent_id"]
        path, node = [], by_id.get(bottom)
        while node is not None:
            path.append(node)
            node = by_id.get(node["parent_id"])
        path.reverse()
        windows.append(path)
        assert 0 < len(path) <= limit
        if body["earlier"] is None:
            assert path[0]["parent_id"] is None, "the last window reaches the root"
            return windows
        assert body["earlier"] == path[0]["id"], "earlier names the window's top message"
        response = client.get(f"/api/conversations/{conversation_id}?limit={limit}&before={body['earlier']}")
        assert response.status_code == 200, response.get_json()
        body = response.get_json()


def test_windows_cover_the_branch_with_no_gaps_or_duplicates_and_reach_the_root(app, client):
    chats = app.extensions["bchat"].chats
    cid = long_conversation(chats, 60)  # 120 messages
    whole = client.get(f"/api/conversations/{cid}").get_json()
    assert "earlier" not in whole and len(whole["messages"]) == 120, "no window: the whole tree"
    expected = branch_of(whole)
    windows = walk_up(client, cid, 25)
    assert [len(w) for w in windows] == [25, 25, 25, 25, 20]
    seen = [m["id"] for w in reversed(windows) for m in w]
    assert seen == expected, "oldest first, each message once, from the root to the leaf"
    assert windows[0][-1]["content"] == "answer 59" and windows[-1][0]["content"] == "question 0"
    last = client.get(f"/api/conversations/{cid}?limit=25").get_json()
    assert last["current_message_id"] == whole["current_message_id"]
    assert {k for k in whole if k != "messages"} <= last.keys(), "the same fields, and earlier"
    # ?before alone: the page above at the largest window (200), here the rest to the root.
    rest = client.get(f"/api/conversations/{cid}?before={last['earlier']}").get_json()
    assert len(rest["messages"]) == 95 and rest["earlier"] is None


def test_a_window_sends_siblings_without_their_branches_and_a_switch_fetches_the_new_branch(app, client):
    chats = app.extensions["bchat"].chats
    cid = long_conversation(chats, 30)  # 60 messages
    whole = client.get(f"/api/conversations/{cid}").get_json()
    main_leaf = whole["current_message_id"]
    early = whole["messages"][4]  # "question 2", an early message with a sibling below
    assert early["content"] == "question 2"
    side = chats.add_user_message(OWNER, cid, "question 2, edited", parent_id=early["parent_id"])[1]
    for turn in range(40):  # the edited question's branch is longer than a window
        chats.add_reply(OWNER, cid, f"side answer {turn}", "complete", Provenance(engine="browser"))
        chats.add_user_message(OWNER, cid, f"side question {turn}")
    switched = client.patch(f"/api/conversations/{cid}", json={"current_message_id": main_leaf})
    assert switched.status_code == 200 and switched.get_json()["current_message_id"] == main_leaf
    assert len(switched.get_json()["messages"]) == 141, "a switch without limit answers the whole tree"

    windows = walk_up(client, cid, 20)
    top = windows[-1]
    sent = client.get(f"/api/conversations/{cid}?limit=20&before={windows[-2][0]['id']}").get_json()
    assert [m["id"] for m in top] == [m["id"] for m in whole["messages"][:len(top)]]
    assert side["id"] in {m["id"] for m in sent["messages"]}, "the sibling is sent for ‹ 1/2 ›"
    assert not any(m["content"].startswith("side") for m in sent["messages"]), "not its branch"

    # The switcher's › on the early message: the new branch's last window, then up to the root.
    response = client.patch(f"/api/conversations/{cid}?limit=20", json={"current_message_id": side["id"]})
    assert response.status_code == 200
    first = response.get_json()
    assert first["messages"][-1]["content"] == "side question 39" and first["earlier"]
    windows = walk_up(client, cid, 20, first)
    contents = [m["content"] for w in reversed(windows) for m in w]
    assert contents == ["question 0", "answer 0", "question 1", "answer 1", "question 2, edited",
                        *[text for t in range(40) for text in (f"side answer {t}", f"side question {t}")]]
    reopened = client.get(f"/api/conversations/{cid}").get_json()
    assert branch_of(reopened)[-1] == first["current_message_id"], "the switch was stored"
    # back with ‹: the early message's window holds both versions again
    back = client.patch(f"/api/conversations/{cid}?limit=200", json={"current_message_id": early["id"]})
    assert back.get_json()["current_message_id"] == main_leaf and len(branch_of(back.get_json())) == 60


def test_a_window_reads_only_the_rows_it_sends(app, client):
    chats = app.extensions["bchat"].chats
    cid = long_conversation(chats, 150)  # 300 messages
    with counting_loads() as loads:
        body = client.get(f"/api/conversations/{cid}?limit=50").get_json()
    assert len(body["messages"]) == 50 and len(loads) <= 52, f"read {len(loads)} rows to send 50"
    with counting_loads() as loads:
        above = client.get(f"/api/conversations/{cid}?limit=50&before={body['earlier']}").get_json()
    assert len(above["messages"]) == 50 and len(loads) <= 53, f"read {len(loads)} rows to send 50"
    assert above["messages"][-1]["id"] == body["messages"][0]["parent_id"], "no gap between pages"


@pytest.mark.parametrize("query, status, code", [
    ("limit=0", 400, "bad_limit"), ("limit=201", 400, "bad_limit"), ("limit=x", 400, "bad_limit"),
    ("before=nope", 404, "not_found"),
])
def test_a_bad_window_is_refused(app, client, query, status, code):
    cid = long_conversation(app.extensions["bchat"].chats, 2)
    response = client.get(f"/api/conversations/{cid}?{query}")
    assert response.status_code == status and response.get_json()["error"]["code"] == code


def test_before_names_a_message_of_this_conversation_only(app, client):
    chats = app.extensions["bchat"].chats
    mine, other = long_conversation(chats, 2), long_conversation(chats, 2)
    foreign = client.get(f"/api/conversations/{other}").get_json()["messages"][-1]["id"]
    assert client.get(f"/api/conversations/{mine}?limit=5&before={foreign}").status_code == 404
    empty = client.post("/api/conversations", json={}).get_json()["id"]
    body = client.get(f"/api/conversations/{empty}?limit=5").get_json()
    assert body["messages"] == [] and body["current_message_id"] is None and body["earlier"] is None


def test_the_openapi_document_describes_the_window(client):
    document = client.get("/api/openapi.json").get_json()
    operation = document["paths"]["/api/conversations/{conversation_id}"]
    assert {p["name"] for p in operation["get"]["parameters"]} == {"limit", "before"}
    assert {p["name"] for p in operation["patch"]["parameters"]} == {"limit"}
    earlier = document["components"]["schemas"]["Conversation"]["properties"]["earlier"]
    assert earlier["nullable"] is True
