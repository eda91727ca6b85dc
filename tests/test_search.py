"""GET /api/search: titles and message text, one owner's only, on SQLite (FTS5) and PostgreSQL."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from webapp.search import fts_query, snippet, terms

pytestmark = pytest.mark.databases("sqlite", "postgresql")


def visitor_with(live_server, conversations: dict[str, list[str]]):
    visitor = live_server.session()
    visitor.visit()
    ids = {}
    for title, contents in conversations.items():
        _, conv = visitor.json("POST", "/api/conversations", {"title": title})
        ids[title] = conv["id"]
        for i, content in enumerate(contents):
            message = {"role": "user", "content": content}
            if i % 2:
                message = {"role": "assistant", "content": content, "provenance": {"engine": "browser"}}
            status, _ = visitor.json("POST", f"/api/conversations/{conv['id']}/messages", message)
            assert status == 201
    return visitor, ids


def found(visitor, query: str) -> list[dict]:
    status, body = visitor.json("GET", f"/api/search?q={quote(query)}")
    assert status == 200, body
    return body["results"]


def test_a_word_only_in_a_message_body_is_found_with_its_context(live_server):
    visitor, ids = visitor_with(live_server, {
        "Baking": ["How long should sourdough proof?", "Overnight in the fridge, about 12 hours."],
        "Travel": ["Trains from Lyon to Turin", "There is a direct TGV most days."],
    })
    (hit,) = found(visitor, "fridge")
    assert hit["conversation_id"] == ids["Baking"] and hit["title"] == "Baking"
    assert "fridge" in hit["snippet"] and hit["message_id"]
    # every word must match, in any case; a title matches too
    assert [r["title"] for r in found(visitor, "DIRECT tgv")] == ["Travel"]
    assert [r["title"] for r in found(visitor, "travel")] == ["Travel"]
    assert found(visitor, "fridge trains") == []
    assert found(visitor, "%") == [] and found(visitor, "") == []


def test_search_sees_edits_and_deletes_and_only_its_owner(live_server):
    visitor, ids = visitor_with(live_server, {"Notes": ["the word is aubergine"]})
    stranger = live_server.session()
    stranger.visit()
    assert found(stranger, "aubergine") == []
    assert [r["title"] for r in found(visitor, "aubergine")] == ["Notes"]
    # a reply that grows (the browser engine's PATCH) is searchable by its latest text
    _, conv = visitor.json("GET", f"/api/conversations/{ids['Notes']}")
    status, reply = visitor.json("POST", f"/api/conversations/{ids['Notes']}/messages", {
        "role": "assistant", "content": "first draft", "status": "streaming",
        "provenance": {"engine": "browser"}})
    assert status == 201
    visitor.json("PATCH", f"/api/conversations/{ids['Notes']}/messages/{reply['id']}",
                 {"content": "now about courgettes", "status": "complete"})
    assert found(visitor, "draft") == []
    assert [r["title"] for r in found(visitor, "courgettes")] == ["Notes"]
    visitor.request("DELETE", f"/api/conversations/{ids['Notes']}")
    assert found(visitor, "aubergine") == []


def test_a_query_over_the_limit_is_refused(live_server):
    visitor = live_server.session()
    visitor.visit()
    status, body = visitor.json("GET", "/api/search?q=" + "a" * 201)
    assert status == 400 and body["error"]["code"] == "query_too_long"


@pytest.mark.databases("sqlite")
def test_query_helpers():
    assert terms('say "hi" OR NOT x*') == ["say", "hi", "or", "not", "x"]
    assert fts_query(["or", 'a"b']) == '"or"* "a""b"*'  # words, never FTS operators
    text = "word " * 30 + "needle " + "tail " * 30
    cut = snippet(text, ["needle"])
    assert cut.startswith("…") and cut.endswith("…") and "needle" in cut
