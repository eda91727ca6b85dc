"""The browser engine reads a long conversation's history a window at a time: a turn in a
300-message conversation asks for no whole tree, the model sees the branch (an edit near the
end as edited, not the version it replaced), and the reply is stored under the new message.
Real wllama in chromium, running the tiny test model (fast to download and to read a prompt)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from browser import chromium_browser
from playwright.sync_api import expect
from test_browser_engine import settings

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPLY_TIMEOUT = 180_000  # ms

# 300 messages on one branch (m0 … m299, short), with m290 edited: the branch goes on from
# "e290", and the version it replaced ("m290 original") has a reply of its own. m249 is longer
# than the browser's whole context: the last window (m250 … m299) fits, the one above it does
# not, so the engine reads two windows and stops. (The page's rough 3 characters a token errs
# short for the tiny model's byte-level vocabulary: a context filled with text would overflow.)
LONG = """async () => {
  const messages = [];
  for (let i = 0; i < 300; i++) {
    const parent = i === 0 ? null : i === 291 ? "e290" : `m${i - 1}`;
    const id = i === 290 ? "e290" : `m${i}`;
    const content = i === 290 ? "e290 edited version" : i === 249 ? "long ".repeat(2200) : `m${i} ok`;
    messages.push({id, parent_id: parent, role: i % 2 ? "assistant" : "user", content});
  }
  messages.push({id: "o290", parent_id: "m289", role: "user", content: "m290 original version"},
                {id: "o291", parent_id: "o290", role: "assistant", content: "old branch reply"});
  const response = await fetch("/api/conversations/import", {method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({format: "bchat.conversation", version: 2,
                          conversation: {title: "a semester", current_message_id: "m299"}, messages})});
  return (await response.json()).id;
}"""

# Every prompt the page gives wllama, recorded on its prototype (the import map sends this
# specifier to the same versioned module the engine imported).
RECORD_PROMPTS = """async () => {
  const { Wllama } = await import("/static/vendor/wllama/index.js");
  window.prompts = [];
  const original = Wllama.prototype.createChatCompletion;
  Wllama.prototype.createChatCompletion = function (options) {
    window.prompts.push(options.messages.map((m) => m.content));
    return original.call(this, options);
  };
}"""


@pytest.fixture
def server(make_app, make_live_server, tmp_path, tiny_model):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny-chat.gguf").symlink_to(tiny_model)
    return make_live_server(make_app(MODEL_PATH=str(folder), BROWSER_MODELS_DIR=str(tmp_path / "bm"),
                                     RATE_LIMIT="1000/minute"))


@pytest.mark.parametrize("viewport, scheme", [({"width": 1366, "height": 850}, "light"),
                                              ({"width": 390, "height": 844}, "dark")])
def test_a_browser_turn_in_a_long_conversation_reads_windows_of_its_branch(server, tmp_path, viewport,
                                                                           scheme):
    shots = Path(os.environ.get("BCHAT_SCREENSHOTS") or tmp_path)
    with chromium_browser() as browser:
        page = browser.new_context(viewport=viewport, color_scheme=scheme).new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        conversation = page.evaluate(LONG)
        asked: list[str] = []
        page.on("request", lambda r: urlsplit(r.url).path == f"/api/conversations/{conversation}"
                and r.method == "GET" and asked.append(urlsplit(r.url).query))
        page.goto(f"{server.url}/c/{conversation}")
        expect(page.get_by_test_id("message")).to_have_count(50)
        page.evaluate(RECORD_PROMPTS)
        page.get_by_test_id("engine-select").select_option("browser")
        page.wait_for_function("() => document.querySelector('[data-testid=browser-status]').dataset.stored")
        page.get_by_test_id("model-download").click()  # under 100 MiB: no dialog asks first
        # the settings sheet shows the conversation's settings from a window of one message
        settings(page, max_tokens=12)
        page.get_by_test_id("composer").fill("what did we say last?")
        page.get_by_test_id("composer").press("Enter")
        # the last reply on screen is the new one once m299 is no longer last (the windows the
        # engine read join those on screen, so counting replies from the top would not find it)
        reply = page.locator('[data-testid="message"][data-role="assistant"]').last
        expect(reply).not_to_contain_text("m299 hello")
        expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
        expect(reply.locator(".meta")).to_contain_text("oldest messages were left out")
        page.wait_for_function("() => window.prompts.length > 0")
        page.screenshot(path=str(shots / f"browser-long-{viewport['width']}-{scheme}.png"))

        # No request for the whole tree: the page, the settings sheet and the engine all asked
        # for windows, and the engine read only the windows its context could hold.
        assert asked and all("limit=" in query for query in asked), asked
        assert "limit=1" in asked, "the settings sheet read the settings from one message"
        above = [query for query in asked if "before=" in query]
        # the page's first window, then the engine's two on preload and two for the turn
        assert len(above) <= 2, asked

        # The model saw the branch: the edit as edited, never the version it replaced, and
        # the newest message last; the oldest were trimmed to the context.
        prompt = page.evaluate("window.prompts.at(-1)")
        assert prompt[-1] == "what did we say last?"
        assert "e290 edited version" in prompt
        assert not any("original" in text or "old branch" in text for text in prompt), prompt
        assert prompt[0] == "m250 ok" and "m289 ok" in prompt, "the last window, from its first user turn"

        # Stored on the branch: the reply under the new message, under the old leaf.
        window = page.evaluate("async id => (await fetch(`/api/conversations/${id}?limit=3`)).json()",
                               conversation)
        old_leaf, user, assistant = window["messages"]
        assert old_leaf["content"].startswith("m299 ")
        assert user["content"] == "what did we say last?" and user["parent_id"] == old_leaf["id"]
        assert assistant["parent_id"] == user["id"] and window["current_message_id"] == assistant["id"]
        assert assistant["engine"] == "browser" and assistant["status"] == "complete", assistant
        assert assistant["meta"]["trimmed_messages"] > 0 and assistant["meta"]["trimmed_more"] is True

        # Regenerated, the reply's history is read from just above it: the same prompt, and
        # still no whole tree.
        asked.clear()
        reply.get_by_role("button", name="Regenerate this reply").click()
        again = page.locator('[data-testid="message"][data-role="assistant"]').last
        expect(again).not_to_have_attribute("data-message-id", assistant["id"])
        expect(again).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
        assert page.evaluate("window.prompts.at(-1)") == prompt
        assert asked and all("limit=" in query for query in asked), asked
        assert f"before={assistant['id']}" in "&".join(asked), asked
        assert not problems
