"""The chat page in a real chromium: send, watch tokens stream, stop, reload, history."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
from browser import chromium

pytestmark = pytest.mark.browser


@pytest.fixture
def server(make_app, make_live_server):
    # Long default replies, so there is time to press Stop in the middle of one.
    return make_live_server(make_app(MAX_TOKENS=4000))


def test_send_stream_stop_reload(server):
    from playwright.sync_api import expect

    with chromium() as context:
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        expect(page.get_by_test_id("model-select")).to_have_value("tiny-chat")

        # 1. a reply streams in; watch it grow, then stop it
        page.get_by_test_id("composer").fill("hello from chromium")
        page.get_by_test_id("composer").press("Enter")
        reply = page.locator('[data-testid="message"][data-role="assistant"]').first
        expect(reply).to_have_attribute("data-status", "streaming")
        expect(reply.locator(".body")).not_to_be_empty()
        first_length = len(reply.locator(".body").inner_text())
        page.wait_for_function(
            "n => document.querySelector('[data-role=assistant] .body').innerText.length > n",
            arg=first_length,
        )
        expect(page.get_by_test_id("stop")).to_be_visible()
        page.get_by_test_id("stop").click()
        expect(reply).to_have_attribute("data-status", "stopped", timeout=10_000)
        expect(reply.locator(".meta")).to_contain_text("stopped")
        expect(page.get_by_test_id("stop")).to_be_hidden()
        assert page.get_by_test_id("composer").input_value() == ""

        # 2. a second, shorter message (reply settings), left to finish; Shift+Enter is a newline
        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("max-tokens").fill("48")
        page.get_by_test_id("settings").locator("summary").click()
        composer = page.get_by_test_id("composer")
        composer.type("line one")
        composer.press("Shift+Enter")
        composer.type("line two")
        assert composer.input_value() == "line one\nline two"
        composer.press("Enter")
        second = page.locator('[data-testid="message"][data-role="assistant"]').nth(1)
        expect(second).to_have_attribute("data-status", "complete", timeout=60_000)
        expect(second.locator(".meta")).to_contain_text("tok/s")
        # the model is named once, in the reply's label (its display name), its file a tap away
        expect(second.get_by_test_id("model-chip")).to_have_text("tiny chat · F32")
        expect(second.locator(".meta")).not_to_contain_text("tiny")
        second.get_by_test_id("model-chip").click()
        expect(second.get_by_test_id("model-chip-facts")).to_contain_text("tiny-chat.gguf")
        expect(second.locator(".meta")).to_contain_text("48 tokens")
        assert "/c/" in page.url
        expect(page.get_by_test_id("conversation")).to_have_count(1)
        expect(page.get_by_test_id("conversation")).to_contain_text("hello from chromium")

        # 3. reload: the history and the statuses are still there
        page.reload()
        messages = page.get_by_test_id("message")
        expect(messages).to_have_count(4)
        roles = [m.get_attribute("data-role") for m in messages.all()]
        statuses = [m.get_attribute("data-status") for m in messages.all()]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert statuses == ["complete", "stopped", "complete", "complete"]
        expect(messages.nth(2).locator(".body")).to_have_text("line one\nline two")

        # 4. new chat, then delete the old one from the list
        page.get_by_test_id("new-chat").click()
        expect(page.get_by_test_id("message")).to_have_count(0)
        page.get_by_test_id("conversation").first.get_by_test_id("delete").click()
        page.get_by_test_id("delete-dialog-confirm").click()  # the page's own dialog, not confirm()
        expect(page.get_by_test_id("conversation")).to_have_count(0)
        assert errors == []


def test_model_output_is_sanitised(server):
    """Markdown from the model renders, but script and event-handler HTML does not survive."""
    from playwright.sync_api import expect

    visitor = server.session()
    visitor.visit()
    _, conv = visitor.json("POST", "/api/conversations", {"title": "xss"})
    path = f"/api/conversations/{conv['id']}/messages"
    visitor.json("POST", path, {"role": "user", "content": "<img src=x onerror=alert(1)>"})
    visitor.json("POST", path, {
        "role": "assistant",
        "content": "**bold** <img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>"
                   "\n\n```python\nprint('hi')\n```",
        "provenance": {"engine": "browser", "model": "tiny-chat"},
    })
    with chromium() as context:
        # the same visitor: hand the browser the owner cookie the API calls were made with
        context.add_cookies([{"name": c.name, "value": c.value, "url": server.url}
                             for c in visitor.cookies])
        page = context.new_page()
        page.goto(f"{server.url}/c/{conv['id']}")
        assistant = page.locator('[data-role="assistant"] .body')
        expect(assistant.locator("strong")).to_have_text("bold")
        expect(assistant.locator("pre code.hljs")).to_have_count(1)
        assert assistant.locator("script").count() == 0
        assert assistant.locator("img").get_attribute("onerror") is None
        user = page.locator('[data-role="user"] .body')
        expect(user).to_have_text("<img src=x onerror=alert(1)>")  # shown as typed, not parsed
        assert page.evaluate("window.pwned") is None


def test_hidden_panels_stay_hidden(server):
    """The share box and the browser-engine status are laid out with flex; hidden must win."""
    from playwright.sync_api import expect

    with chromium() as context:
        page = context.new_page()
        page.goto(server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        for testid in ("share-box", "browser-status", "stop", "error", "use-server"):
            expect(page.get_by_test_id(testid)).to_be_hidden()
        page.get_by_test_id("engine-select").select_option("browser")
        expect(page.get_by_test_id("browser-status")).to_be_visible()
        page.get_by_test_id("engine-select").select_option("server")
        expect(page.get_by_test_id("browser-status")).to_be_hidden()


def rendered_text(page, markdown: str) -> str:
    """``markdown`` as the page's own renderer shows it (its innerText)."""
    return page.evaluate("""async (text) => {
      const { renderMarkdown } = await import("/static/js/render.js");
      const box = document.createElement("div");
      box.className = "body";
      document.querySelector("[data-testid=messages]").append(box);
      renderMarkdown(box, text);
      const shown = box.innerText;
      box.remove();
      return shown;
    }""", markdown)


def test_switching_conversations_mid_reply_and_back_finds_it_still_streaming(server):
    from playwright.sync_api import expect

    with chromium() as context:
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        # An older conversation to switch to.
        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("max-tokens").fill("8")
        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("composer").fill("an older chat")
        page.get_by_test_id("composer").press("Enter")
        expect(page.locator('[data-role="assistant"]').first).to_have_attribute(
            "data-status", "complete", timeout=30_000)
        page.get_by_test_id("new-chat").click()

        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("max-tokens").fill("2500")
        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("composer").fill("a long one")
        page.get_by_test_id("composer").press("Enter")
        reply = page.locator('[data-role="assistant"]').first
        expect(reply).to_have_attribute("data-status", "streaming")
        expect(reply.locator(".body")).not_to_be_empty()
        long_url = page.url

        page.get_by_test_id("conversation").filter(has_text="an older chat").click()
        expect(page.get_by_test_id("message")).to_have_count(2)
        expect(page.locator('[data-role="assistant"]').first).to_have_attribute("data-status", "complete")
        expect(page.get_by_test_id("stop")).to_be_hidden()
        page.get_by_test_id("conversation").filter(has_text="a long one").click()
        expect(page).to_have_url(long_url)
        reply = page.locator('[data-role="assistant"]').first
        expect(reply).to_have_attribute("data-status", "streaming")
        before = len(reply.locator(".body").inner_text())
        page.wait_for_function(
            "n => document.querySelector('[data-role=assistant] .body').innerText.length > n",
            arg=before,
        )
        expect(page.get_by_test_id("stop")).to_be_visible()
        expect(reply).to_have_attribute("data-status", "complete", timeout=120_000)
        expect(reply.locator(".meta")).to_contain_text("2500 tokens")
        conversation_id = page.url.rsplit("/c/", 1)[1]
        stored = page.evaluate(
            "async id => (await (await fetch(`/api/conversations/${id}`)).json()).messages[1]",
            conversation_id)
        assert stored["status"] == "complete"
        assert reply.locator(".body").inner_text() == rendered_text(page, stored["content"])
        assert errors == []


def test_the_page_reconnects_and_resumes_the_reply_it_was_showing(server):
    from playwright.sync_api import expect

    with chromium() as context:
        page = context.new_page()
        page.goto(server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("max-tokens").fill("2000")
        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("composer").fill("keep going")
        page.get_by_test_id("composer").press("Enter")
        reply = page.locator('[data-role="assistant"]').first
        expect(reply.locator(".body")).not_to_be_empty()
        # Drop the connection from the server's side, as a flaky network would; the page
        # reconnects by itself and resumes from what it shows.
        services = server.app.extensions["bchat"]
        with services.sockets_lock:
            open_sockets = list(services.sockets)
        assert open_sockets
        for chat_socket in open_sockets:
            chat_socket.ws.close()
        expect(page.get_by_test_id("connection")).to_have_text("reconnecting…")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        expect(reply).to_have_attribute("data-status", "complete", timeout=120_000)
        conversation_id = page.url.rsplit("/c/", 1)[1]
        stored = page.evaluate(
            "async id => (await (await fetch(`/api/conversations/${id}`)).json()).messages[1]",
            conversation_id)
        shown = reply.locator(".body").inner_text()
        assert shown == rendered_text(page, stored["content"]), "each character shown once"


def test_an_error_frame_marks_the_reply_it_names_among_several_followed(server):
    """The page follows two replies at once: one resumed (another client's run) and one it
    sent. The second's conversation is deleted mid-reply, so its run ends with an error frame
    that names its message_id: that reply, and only that one, is marked failed with why."""
    import re

    from playwright.sync_api import expect

    visitor = server.session()
    visitor.visit()
    other_tab = visitor.ws()
    other_tab.chat("the other tab's question", options={"max_tokens": 2000})
    started, _ = other_tab.until("started")
    kept_id = started["conversation"]["id"]

    with chromium() as context:
        context.add_cookies([{"name": c.name, "value": c.value, "url": server.url}
                             for c in visitor.cookies])
        page = context.new_page()
        page.goto(f"{server.url}/c/{kept_id}")
        kept = page.locator('[data-role="assistant"]').first
        expect(kept.locator(".body")).not_to_be_empty()  # resumed: this page follows it now
        other_tab.close()

        page.get_by_test_id("new-chat").click()
        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("max-tokens").fill("2000")
        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("composer").fill("a question whose conversation goes away")
        page.get_by_test_id("composer").press("Enter")
        doomed = page.locator('[data-role="assistant"]').first
        expect(doomed.locator(".body")).not_to_be_empty()
        expect(page).to_have_url(re.compile(r"/c/"))
        doomed_id = page.url.rsplit("/c/", 1)[1]
        assert doomed_id != kept_id
        deleted = page.evaluate(
            "async id => (await fetch(`/api/conversations/${id}`, {method: 'DELETE'})).status",
            doomed_id)
        assert deleted == 204

        expect(doomed).to_have_attribute("data-status", "failed", timeout=120_000)
        expect(doomed.locator(".meta")).to_contain_text("deleted")
        expect(page.get_by_test_id("error-text")).to_contain_text("deleted")
        # the reply followed beside it went on, untouched by the other's error
        page.get_by_test_id("conversation").filter(has_text="the other tab").click()
        kept = page.locator('[data-role="assistant"]').first
        expect(kept).to_have_attribute("data-status", "complete", timeout=120_000)


class RestartableServer:
    """A live server that can die (as a killed process would: its sockets close, its runs end
    "interrupted") and come back on the same port with a fresh app on the same database."""

    def __init__(self, make_app, **config) -> None:
        self.make_app, self.config = make_app, config
        self.server = None
        self.start(port=0)

    def start(self, port: int | None = None) -> None:
        from werkzeug.serving import make_server

        config = dict(self.config)
        if self.server is not None:
            config["DATABASE_URL"] = self.app.config["DATABASE_URL"]
        self.app = self.make_app(**config)
        self.server = make_server("127.0.0.1", self.port if port is None else port, self.app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.app.extensions["bchat"].shutdown()  # open sockets close, partial replies are kept
        self.server.shutdown()
        self.server.server_close()  # the port refuses connections until start()
        self.thread.join(5)


@pytest.fixture
def restartable(make_app):
    server = RestartableServer(make_app, MAX_TOKENS=4000)
    yield server
    server.stop()


@pytest.mark.parametrize("viewport", [{"width": 1366, "height": 850}, {"width": 390, "height": 844}],
                         ids=["desktop", "phone"])
def test_a_dead_server_is_reported_at_once_and_cleared_when_it_is_back(restartable, viewport, tmp_path):
    """The server dies mid-reply: a banner says so within 2 s, with Retry; Enter says the
    message was not sent and keeps it in the box; when the server is back the banner goes by
    itself, the reply shows as interrupted and its controls (edit, regenerate, continue, ⓘ) are
    there without a reload, and the kept text sends."""
    from playwright.sync_api import expect

    shots = Path(os.environ.get("BCHAT_SCREENSHOTS") or tmp_path)
    server = restartable
    with chromium() as context:
        page = context.new_page()
        page.set_viewport_size(viewport)
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        page.get_by_test_id("composer").fill("keep going")
        page.get_by_test_id("composer").press("Enter")
        reply = page.locator('[data-role="assistant"]').first
        expect(reply.locator(".body")).not_to_be_empty()

        server.stop()
        banner = page.get_by_test_id("error")
        expect(banner).to_be_visible(timeout=2000)
        said = re.compile("connection .*dropped|can.t be reached")
        expect(page.get_by_test_id("error-text")).to_contain_text(said)
        expect(page.get_by_test_id("retry")).to_be_visible()
        name = "phone" if viewport["width"] < 500 else "desktop"
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            page.screenshot(path=str(shots / f"dead-server-{name}-{scheme}.png"))

        # Enter while the server is gone: said, and the text stays to send later.
        composer = page.get_by_test_id("composer")
        composer.fill("are you there?")
        composer.press("Enter")
        expect(page.get_by_test_id("error-text")).to_contain_text("Not sent")
        expect(composer).to_have_value("are you there?")
        page.get_by_test_id("retry").click()  # tries at once; the server is still down
        expect(banner).to_be_visible()

        server.start()
        expect(page.get_by_test_id("connection")).to_have_text("connected", timeout=15_000)
        expect(banner).to_be_hidden()
        expect(reply).to_have_attribute("data-status", "interrupted")
        # the tree controls come back by themselves
        expect(reply.get_by_test_id("regenerate")).to_be_visible()
        expect(reply.get_by_test_id("continue")).to_be_visible()
        expect(reply.get_by_test_id("reply-options")).to_be_visible()
        expect(page.locator('[data-role="user"]').first.get_by_test_id("edit")).to_have_count(1)

        composer.press("Enter")
        expect(composer).to_have_value("")
        expect(page.locator('[data-role="user"]')).to_have_count(2)
        assert errors == []
