"""Conversation trees in real chromium: regenerate, ‹ n/m ›, edit, continue, settings per
conversation, with the server engine and the browser engine (wllama, the tiny test model)."""

from __future__ import annotations

import pytest
from browser import chromium
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

REPLY_TIMEOUT = 120_000


@pytest.fixture
def server(make_app, make_live_server):
    return make_live_server(make_app())


def open_settings(page, *, max_tokens: int | None = None, system: str | None = None,
                  temperature: float | None = 0) -> None:
    page.get_by_test_id("settings").locator("summary").click()
    if max_tokens is not None:
        page.get_by_test_id("max-tokens").fill(str(max_tokens))
        page.get_by_test_id("max-tokens").dispatch_event("change")
    if temperature is not None:
        page.get_by_test_id("temperature").fill(str(temperature))
        page.get_by_test_id("temperature").dispatch_event("change")
    if system is not None:
        page.get_by_test_id("system-prompt").fill(system)
        page.get_by_test_id("system-prompt").dispatch_event("change")
    page.get_by_test_id("settings").locator("summary").click()


def assistant(page, n: int = 0):
    return page.locator('[data-testid="message"][data-role="assistant"]').nth(n)


def stored(page):
    conversation_id = page.url.rsplit("/c/", 1)[1]
    return page.evaluate("async id => (await (await fetch(`/api/conversations/${id}`)).json())",
                         conversation_id)


def send(page, text: str) -> None:
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("composer").press("Enter")


def settled(page, n: int = 0) -> None:
    expect(assistant(page, n)).not_to_have_attribute("data-status", "streaming", timeout=REPLY_TIMEOUT)
    expect(page.get_by_test_id("stop")).to_be_hidden(timeout=REPLY_TIMEOUT)


@pytest.mark.parametrize("engine", ["server", "browser"])
def test_regenerate_switch_reload_edit(server, engine):
    with chromium() as context:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("dialog", lambda dialog: errors.append(f"native dialog: {dialog.message}"))
        page.goto(server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        page.get_by_test_id("engine-select").select_option(engine)
        if engine == "browser":
            page.get_by_test_id("backend-select").select_option("wasm-st")
        open_settings(page, max_tokens=8)
        send(page, "first question")
        settled(page)
        first_text = assistant(page).locator(".body").inner_text()

        # Regenerate twice: three versions of the reply, the newest on screen.
        for expected in ("2/2", "3/3"):
            assistant(page).get_by_test_id("regenerate").click()
            settled(page)
            expect(assistant(page).get_by_test_id("branch-pos")).to_have_text(expected)
        expect(page.get_by_test_id("message")).to_have_count(2)
        tree = stored(page)
        replies = [m for m in tree["messages"] if m["role"] == "assistant"]
        assert len(replies) == 3 and len({m["parent_id"] for m in replies}) == 1
        assert {m["engine"] for m in replies} == {engine}

        # Step back to the first version; a reload keeps it.
        assistant(page).get_by_test_id("branch-prev").click()
        expect(assistant(page).get_by_test_id("branch-pos")).to_have_text("2/3")
        assistant(page).get_by_test_id("branch-prev").click()
        expect(assistant(page).get_by_test_id("branch-pos")).to_have_text("1/3")
        expect(assistant(page).locator(".body")).to_have_text(first_text)
        page.reload()
        expect(assistant(page).get_by_test_id("branch-pos")).to_have_text("1/3")
        assert stored(page)["current_message_id"] == replies[0]["id"]

        # Edit the question: a new branch; the old one is one click away.
        user = page.locator('[data-testid="message"][data-role="user"]').first
        user.get_by_test_id("edit").click()
        page.get_by_test_id("edit-text").fill("second question")
        page.get_by_test_id("edit-send").click()
        settled(page)
        user = page.locator('[data-testid="message"][data-role="user"]').first
        expect(user.locator(".body")).to_have_text("second question")
        expect(user.get_by_test_id("branch-pos")).to_have_text("2/2")
        user.get_by_test_id("branch-prev").click()
        expect(page.locator('[data-testid="message"][data-role="user"]').first.locator(".body")).to_have_text(
            "first question")
        # Switching to a message shows the newest branch below it.
        expect(assistant(page).get_by_test_id("branch-pos")).to_have_text("3/3")
        assert errors == []


def test_continue_a_reply_cut_off_at_the_token_limit(server):
    with chromium() as context:
        page = context.new_page()
        page.goto(server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        open_settings(page, max_tokens=8)
        send(page, "go on")
        settled(page)
        reply = assistant(page)
        expect(reply.get_by_test_id("cut-off")).to_be_visible()
        message_id = reply.get_attribute("data-message-id")
        before = stored(page)["messages"][1]["content"]
        reply.get_by_test_id("continue").click()
        settled(page)
        after = stored(page)["messages"]
        assert len(after) == 2 and after[1]["id"] == message_id
        assert after[1]["content"].startswith(before) and len(after[1]["content"]) > len(before)
        assert after[1]["usage"]["completion_tokens"] == 16
        expect(assistant(page)).to_have_attribute("data-message-id", message_id)


def test_settings_belong_to_their_conversation(server):
    with chromium() as context:
        page = context.new_page()
        page.goto(server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        open_settings(page, max_tokens=6, system="You are a pirate.")
        send(page, "in A")
        settled(page)
        a_url = page.url
        assistant(page).get_by_test_id("reply-options").click()
        expect(page.get_by_test_id("reply-options-box")).to_contain_text("You are a pirate.")
        assert stored(page)["settings"]["system"] == "You are a pirate."

        page.get_by_test_id("new-chat").click()
        expect(page.get_by_test_id("system-prompt")).to_have_value("")
        open_settings(page, max_tokens=5)
        send(page, "in B")
        settled(page)
        b = stored(page)
        assert "system" not in b["settings"]
        assert b["messages"][1]["meta"]["options"]["system"] is None
        assert b["messages"][1]["usage"]["completion_tokens"] == 5

        page.goto(a_url)
        expect(page.get_by_test_id("system-prompt")).to_have_value("You are a pirate.")
        expect(page.get_by_test_id("max-tokens")).to_have_value("6")


def test_the_page_and_the_server_agree_on_what_the_model_sees(server):
    """tree.js mirrors the server's tree rules (chats.Tree, current_branch, model_history) for
    the browser engine: for every message of a branched conversation, and for the current
    branch, chromium's pathTo + modelHistory give the server's turns."""
    from sqlalchemy import select

    from webapp.chats import Tree, current_branch, model_history
    from webapp.models import Conversation

    visitor = server.session()
    visitor.visit()
    _, conv = visitor.json("POST", "/api/conversations", {"title": "tree"})
    path = f"/api/conversations/{conv['id']}/messages"
    ids: dict[str, str] = {}

    def post(name: str, parent: str | None, role: str, content: str, status: str = "complete") -> None:
        body = {"role": role, "content": content, "parent_id": ids.get(parent) if parent else None}
        if role == "assistant":
            body.update(status=status, provenance={"engine": "browser", "model": "tiny-chat"})
        status_code, message = visitor.json("POST", path, body)
        assert status_code == 201, message
        ids[name] = message["id"]

    post("u1", None, "user", "first question")
    post("a1", "u1", "assistant", "<think>weighing it</think>\nthe answer")
    post("a1b", "u1", "assistant", "")  # complete and empty: kept
    post("u2", "a1", "user", "second")
    post("a2", "u2", "assistant", "", "failed")  # failed and empty: left out
    post("u3", "a2", "user", "second, again")  # stands for u2 too (alternation)
    post("a3", "u3", "assistant", "partial", "stopped")
    post("a2b", "u2", "assistant", "another branch")
    post("u4", "a2b", "user", "third")
    post("a4", "u4", "assistant", "still growing", "streaming")  # not seen until it ends
    status_code, _ = visitor.json("PATCH", f"/api/conversations/{conv['id']}",
                                  {"current_message_id": ids["a2b"]})
    assert status_code == 200

    with server.app.extensions["bchat"].db.read() as session:
        stored = session.scalar(select(Conversation).where(Conversation.public_id == conv["id"]))
        tree = Tree(stored.messages)
        public = tree.public_ids()
        expected = {public[m.id]: model_history(tree.path(m.id)) for m in stored.messages}
        expected["current"] = model_history(current_branch(stored))

    with chromium() as context:
        context.add_cookies([{"name": c.name, "value": c.value, "url": server.url}
                             for c in visitor.cookies])
        page = context.new_page()
        page.goto(server.url + "/")
        seen = page.evaluate("""async (id) => {
          const { modelHistory, pathTo } = await import("/static/js/tree.js");
          const conversation = await (await fetch(`/api/conversations/${id}`)).json();
          const turns = (upTo) => modelHistory(pathTo(conversation.messages, upTo));
          const seen = Object.fromEntries(conversation.messages.map((m) => [m.id, turns(m.id)]));
          seen.current = turns(conversation.current_message_id);
          return seen;
        }""", conv["id"])

    assert seen == expected
    # the rules were exercised, not just an empty agreement
    assert expected["current"] == [{"role": "user", "content": "first question"},
                                   {"role": "assistant", "content": "the answer"},
                                   {"role": "user", "content": "second"},
                                   {"role": "assistant", "content": "another branch"},
                                   {"role": "user", "content": "third"}]
    assert [t["content"] for t in expected[ids["a3"]]] == [
        "first question", "the answer", "second, again", "partial"]
    assert expected[ids["a1b"]][-1] == {"role": "assistant", "content": ""}
