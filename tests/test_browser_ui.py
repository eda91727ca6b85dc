"""The chat page as people use it, in chromium at a desktop and a phone size, light and dark:
the drawer, search, copy, math, thinking blocks, the context meter, the composer's limits,
in-page dialogs, banners, shortcuts, themes, and axe-core's accessibility checks.

Each state is saved as a screenshot under $BCHAT_SCREENSHOTS (default: a pytest temporary
folder) so a person can look at them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from browser import chromium_browser
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

DESKTOP = {"width": 1366, "height": 850}
PHONE = {"width": 390, "height": 844}
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"

RICH_REPLY = (
    "<think>The user asked for Euler. Recall e^(i pi) = -1.</think>"
    "Here is **Euler's identity**: $e^{i\\pi} + 1 = 0$, and an integral:\n\n"
    "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$\n\n"
    "| n | n² |\n|---|---|\n| 2 | 4 |\n| 3 | 9 |\n\n"
    "> Mathematics is the language of nature.\n\n"
    "- first\n- second\n\n"
    "```python\ndef double(x):\n    return x * 2  # twice\n```\n"
)
CODE = "def double(x):\n    return x * 2  # twice"


@pytest.fixture
def server(make_app, make_live_server):
    return make_live_server(make_app(MAX_TOKENS=16))


def new_page(browser, *, viewport=DESKTOP, scheme="light", clipboard=False):
    context = browser.new_context(
        viewport=viewport, color_scheme=scheme,
        permissions=["clipboard-read", "clipboard-write"] if clipboard else [],
    )
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def native_dialog(dialog):  # rename and delete must use the page's own dialogs
        problems.append(f"native {dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", native_dialog)
    return page, problems


def open_chat(page, url: str, path: str = "/") -> None:
    page.goto(url + path)
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    expect(page.get_by_test_id("model-select")).to_have_value("tiny-chat")


def seed(page, conversations: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """Conversations made through the API as this page's visitor: {title: id}."""
    return page.evaluate("""async (conversations) => {
      const post = (url, body) => fetch(url, {method: "POST", body: JSON.stringify(body),
        headers: {"Content-Type": "application/json"}}).then((r) => r.json());
      const ids = {};
      for (const [title, messages] of Object.entries(conversations)) {
        const conv = await post("/api/conversations", {title});
        for (const [role, content] of messages) {
          const message = {role, content};
          if (role === "assistant") message.provenance = {engine: "browser", model: "tiny-chat"};
          await post(`/api/conversations/${conv.id}/messages`, message);
        }
        ids[title] = conv.id;
      }
      return ids;
    }""", conversations)


def shoot(page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"))


def send(page, text: str) -> None:
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("composer").press("Enter")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_phone_drawer_reaches_every_list_action(server, shots, scheme):
    with chromium_browser() as browser:
        page, problems = new_page(browser, viewport=PHONE, scheme=scheme)
        open_chat(page, server.url)
        expect(page.get_by_test_id("welcome")).to_be_visible()
        expect(page.get_by_test_id("model-card")).to_contain_text("tiny-chat")
        expect(page.get_by_test_id("model-card")).to_contain_text("F32")
        # one header line: the header is no taller than its one row of controls
        assert page.locator(".chat-header").bounding_box()["height"] <= 56
        shoot(page, shots, f"phone-{scheme}-welcome")
        ids = seed(page, {"Old notes": [("user", "remember the gooseberry jam")],
                          "Shopping": [("user", "milk and bread")]})
        page.reload()
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        # closed, the drawer's contents are out of reach (not just off-screen)
        expect(page.get_by_test_id("new-chat")).to_be_hidden()
        page.get_by_test_id("sidebar-toggle").click()
        expect(page.get_by_test_id("sidebar-toggle")).to_have_attribute("aria-expanded", "true")
        for testid in ("new-chat", "search", "import-button", "theme-toggle", "shortcuts-button"):
            expect(page.get_by_test_id(testid)).to_be_visible()
        expect(page.get_by_test_id("conversation")).to_have_count(2)
        # it slides in: wait for it to arrive, then check it is all on screen
        page.wait_for_function("() => document.querySelector('.sidebar').getBoundingClientRect().x >= 0")
        box = page.get_by_test_id("sidebar").bounding_box()
        assert box["x"] + box["width"] <= PHONE["width"]
        shoot(page, shots, f"phone-{scheme}-drawer")

        # rename through the page's own dialog
        item = page.get_by_test_id("conversation").filter(has_text="Shopping")
        item.get_by_test_id("rename").click()
        dialog = page.get_by_test_id("rename-dialog")
        expect(dialog).to_be_visible()
        shoot(page, shots, f"phone-{scheme}-rename")
        dialog.get_by_test_id("rename-dialog-input").fill("Groceries")
        dialog.get_by_test_id("rename-dialog-confirm").click()
        expect(page.get_by_test_id("conversation").filter(has_text="Groceries")).to_have_count(1)

        # delete: cancel first (nothing happens), then confirm
        item = page.get_by_test_id("conversation").filter(has_text="Old notes")
        item.get_by_test_id("delete").click()
        page.get_by_test_id("delete-dialog-cancel").click()
        expect(page.get_by_test_id("conversation")).to_have_count(2)
        item.get_by_test_id("delete").click()
        page.keyboard.press("Escape")  # closes the dialog only, not the drawer behind it
        expect(page.get_by_test_id("delete-dialog")).to_have_count(0)
        expect(page.get_by_test_id("sidebar-toggle")).to_have_attribute("aria-expanded", "true")
        expect(page.get_by_test_id("conversation")).to_have_count(2)
        item.get_by_test_id("delete").click()
        shoot(page, shots, f"phone-{scheme}-delete")
        page.get_by_test_id("delete-dialog-confirm").click()
        expect(page.get_by_test_id("conversation")).to_have_count(1)

        # search from the drawer; opening a result closes the drawer
        page.get_by_test_id("search").fill("bread")
        result = page.get_by_test_id("search-result")
        expect(result).to_have_count(1)
        result.click()
        expect(page).to_have_url(re.compile(f"/c/{ids['Shopping']}$"))
        expect(page.get_by_test_id("sidebar-toggle")).to_have_attribute("aria-expanded", "false")
        expect(page.locator(".chat-title")).to_have_text("Groceries")

        # settings open as a sheet that fits the screen
        page.get_by_test_id("settings").locator("summary").click()
        sheet = page.locator(".settings-body")
        expect(sheet).to_be_visible()
        box = sheet.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
        assert box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"] + 1
        shoot(page, shots, f"phone-{scheme}-settings")
        page.get_by_test_id("settings").locator("summary").click()

        # share and export live in the header on the phone too
        page.get_by_test_id("share").click()
        expect(page.get_by_test_id("share-url")).not_to_have_value("")
        page.get_by_test_id("sidebar-toggle").click()
        expect(page.get_by_test_id("share-item")).to_have_count(1)
        expect(page.get_by_test_id("revoke")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.get_by_test_id("sidebar-toggle")).to_have_attribute("aria-expanded", "false")
        assert problems == []


def test_search_finds_a_word_that_is_only_in_a_message_body(server, shots):
    with chromium_browser() as browser:
        page, problems = new_page(browser)
        open_chat(page, server.url)
        ids = seed(page, {
            "Recipes": [("user", "what goes in a pesto?"),
                        ("assistant", "Basil, pine nuts, parmesan and **pecorino**.")],
            "Travel": [("user", "trains to Turin")],
        })
        page.reload()
        expect(page.get_by_test_id("conversation")).to_have_count(2)
        page.keyboard.press("Control+k")
        expect(page.get_by_test_id("search")).to_be_focused()
        page.keyboard.type("pecorino")
        result = page.get_by_test_id("search-result")
        expect(result).to_have_count(1)
        expect(result).to_contain_text("Recipes")
        expect(result).to_contain_text("pecorino")
        shoot(page, shots, "desktop-light-search")
        result.click()
        expect(page).to_have_url(re.compile(f"/c/{ids['Recipes']}$"))
        expect(page.get_by_test_id("message")).to_have_count(2)
        page.get_by_test_id("search").fill("")
        expect(page.get_by_test_id("conversation")).to_have_count(2)
        # grouped by date: both were made today
        expect(page.locator(".list-heading").first).to_have_text("Today")
        assert problems == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_rich_replies_copy_math_thinking(server, shots, scheme):
    with chromium_browser() as browser:
        page, problems = new_page(browser, scheme=scheme, clipboard=True)
        open_chat(page, server.url)
        ids = seed(page, {"Euler": [("user", "Tell me about Euler's identity"),
                                    ("assistant", RICH_REPLY)]})
        page.goto(f"{server.url}/c/{ids['Euler']}")
        reply = page.locator('[data-testid="message"][data-role="assistant"]')
        # roles are labelled, for eyes and for screen readers
        expect(reply.locator(".role-label")).to_contain_text("Assistant")
        assert page.evaluate("""() => {
          const m = document.querySelector('[data-role=assistant]');
          return document.getElementById(m.getAttribute('aria-labelledby')).textContent;
        }""").startswith("Assistant")
        # KaTeX: inline and display math become MathML, no TeX left showing
        body = reply.locator(".body")
        expect(body.locator("math")).to_have_count(2)
        expect(body.locator(".math-display math")).to_have_count(1)
        assert "\\frac" not in body.inner_text() and "$" not in body.inner_text()
        # the thinking block is folded away from the answer, and opens on demand
        thinking = body.get_by_test_id("thinking")
        expect(thinking).to_have_count(1)
        expect(thinking).not_to_have_attribute("open", "")
        expect(thinking.locator(".thinking-body")).to_be_hidden()
        assert "Recall" not in body.inner_text()
        thinking.locator("summary").click()
        expect(thinking.locator(".thinking-body")).to_be_visible()
        expect(thinking.locator(".thinking-body")).to_contain_text("Recall e^(i pi)")
        # tables have borders; blockquotes a bar
        border = page.evaluate("getComputedStyle(document.querySelector('.body td')).borderTopStyle")
        bar = page.evaluate("getComputedStyle(document.querySelector('.body blockquote')).borderLeftWidth")
        assert border == "solid" and bar != "0px"
        # the code block: language, highlighting, copy
        expect(body.locator(".code-head")).to_have_attribute("data-lang", "python")
        expect(body.locator("pre code.hljs")).to_have_count(1)
        shoot(page, shots, f"desktop-{scheme}-rich-reply")
        body.get_by_test_id("copy-code").click()
        assert page.evaluate("navigator.clipboard.readText()") == CODE
        # copy on every message: the exact stored text, markdown and all
        expect(page.get_by_test_id("copy")).to_have_count(2)
        reply.get_by_test_id("copy").click()
        expect(reply.get_by_test_id("copy")).to_have_attribute("data-copied", "true")
        assert page.evaluate("navigator.clipboard.readText()") == RICH_REPLY
        user_copy = page.locator('[data-role="user"]').get_by_test_id("copy")
        user_copy.click()
        expect(user_copy).to_have_attribute("data-copied", "true")
        assert page.evaluate("navigator.clipboard.readText()") == "Tell me about Euler's identity"
        assert problems == []


def test_a_streaming_think_block_stays_open_until_the_thought_ends(server):
    with chromium_browser() as browser:
        page, problems = new_page(browser)
        open_chat(page, server.url)
        shown = page.evaluate("""async () => {
          const { renderMarkdown } = await import("/static/js/render.js");
          const box = document.createElement("div");
          document.querySelector("[data-testid=messages]").append(box);
          renderMarkdown(box, "<think>still weighing it");
          const during = box.querySelector("details").open;
          renderMarkdown(box, "<think>still weighing it up</think>The answer is 4.");
          return {during, after: box.querySelector("details").open, text: box.innerText};
        }""")
        assert shown["during"] is True and shown["after"] is False
        assert shown["text"].strip().endswith("The answer is 4.")
        assert problems == []


def test_the_context_meter_moves_and_the_composer_warns_instead_of_cutting(server, shots):
    with chromium_browser() as browser:
        page, problems = new_page(browser)
        open_chat(page, server.url)
        meter = page.get_by_test_id("context-meter")
        expect(meter).to_have_attribute("aria-valuemax", "4096")
        expect(meter).to_have_attribute("data-used", "0")
        send(page, "first question")
        reply = page.locator('[data-role="assistant"]').first
        expect(reply).to_have_attribute("data-status", "complete", timeout=60_000)
        first = int(meter.get_attribute("data-used"))
        assert first > 0
        send(page, "second question")
        expect(page.locator('[data-role="assistant"]').nth(1)).to_have_attribute(
            "data-status", "complete", timeout=60_000)
        page.wait_for_function(
            "n => Number(document.querySelector('[data-testid=context-meter]').dataset.used) > n", arg=first)

        # 40,000 characters: kept whole, counted, and not sent (the server takes 32,000)
        composer = page.get_by_test_id("composer")
        composer.fill("x" * 40_000)
        assert len(composer.input_value()) == 40_000
        counter = page.get_by_test_id("composer-counter")
        expect(counter).to_be_visible()
        expect(counter).to_have_text("40,000 / 32,000")
        expect(page.get_by_test_id("composer-note")).to_contain_text("Shorten it by 8,000")
        expect(page.get_by_test_id("send")).to_be_disabled()
        composer.press("Enter")
        expect(page.get_by_test_id("message")).to_have_count(4)
        shoot(page, shots, "desktop-light-over-limit")
        # under the character limit but over the model's context: also said, also not sent
        composer.fill("word " * 5_000)
        expect(page.get_by_test_id("composer-note")).to_contain_text("cannot fit the model's context")
        expect(page.get_by_test_id("send")).to_be_disabled()
        expect(meter).to_have_attribute("data-level", "full")
        # something that fits is fine again
        composer.fill("short")
        expect(page.get_by_test_id("composer-note")).to_be_hidden()
        expect(page.get_by_test_id("send")).to_be_enabled()
        assert problems == []


def test_shortcuts_banners_and_theme(server, shots):
    with chromium_browser() as browser:
        page, problems = new_page(browser)
        open_chat(page, server.url, "/c/does-not-exist")
        error = page.get_by_test_id("error")
        expect(error).to_be_visible()
        expect(page.get_by_test_id("error-text")).to_contain_text("does not exist")
        page.get_by_test_id("dismiss-error").click()
        expect(error).to_be_hidden()
        # the help overlay, then the shortcuts it lists
        page.locator("body").press("?")
        help_overlay = page.get_by_test_id("shortcuts")
        expect(help_overlay).to_be_visible()
        shoot(page, shots, "desktop-light-shortcuts")
        page.keyboard.press("Escape")
        expect(help_overlay).to_be_hidden()
        page.get_by_test_id("composer").blur()
        page.keyboard.press("Control+/")
        expect(page.get_by_test_id("composer")).to_be_focused()
        send(page, "hi")
        expect(page.locator('[data-role="assistant"]').first).to_have_attribute(
            "data-status", "complete", timeout=60_000)
        page.keyboard.press("Control+Shift+O")
        expect(page.get_by_test_id("message")).to_have_count(0)
        expect(page.get_by_test_id("welcome")).to_be_visible()

        # the theme: follows the system until chosen, then remembered; code colours follow
        keyword_light = page.evaluate("""() => {
          const s = document.createElement('span'); s.className = 'hljs-keyword';
          document.body.append(s); const c = getComputedStyle(s).color; s.remove(); return c; }""")
        background_light = page.evaluate("getComputedStyle(document.body).backgroundColor")
        page.get_by_test_id("theme-toggle").click()
        expect(page.locator("html")).to_have_attribute("data-theme", "dark")
        page.reload()
        expect(page.locator("html")).to_have_attribute("data-theme", "dark")
        expect(page.get_by_test_id("theme-toggle")).to_have_attribute(
            "aria-label", "Switch to the light theme")
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") != background_light
        keyword_dark = page.evaluate("""() => {
          const s = document.createElement('span'); s.className = 'hljs-keyword';
          document.body.append(s); const c = getComputedStyle(s).color; s.remove(); return c; }""")
        assert keyword_dark != keyword_light
        shoot(page, shots, "desktop-dark-chosen")
        # the desktop toggle folds the sidebar away and back
        page.get_by_test_id("sidebar-toggle").click()
        expect(page.get_by_test_id("new-chat")).to_be_hidden()
        page.get_by_test_id("sidebar-toggle").click()
        expect(page.get_by_test_id("new-chat")).to_be_visible()
        assert problems == []


def test_first_load_leaves_the_browser_engine_and_renderers_for_later(server):
    with chromium_browser() as browser:
        page, problems = new_page(browser)
        loaded: list[str] = []
        page.on("request", lambda request: loaded.append(request.url))
        open_chat(page, server.url)
        page.wait_for_load_state("networkidle")
        assert not [u for u in loaded if "wllama" in u or "engines/browser.js" in u]
        assert not [u for u in loaded if "katex" in u or "highlight" in u]
        # picking the browser engine is what fetches it
        wllama = "/static/vendor/wllama/index.js"  # at its ?v= URL, from the import map
        with page.expect_request(lambda request: request.url.split("?")[0].endswith(wllama)):
            page.get_by_test_id("engine-select").select_option("browser")
        expect(page.get_by_test_id("browser-status")).to_be_visible()
        expect(page.get_by_test_id("backend-select")).to_be_visible()
        assert problems == []


def axe_violations(page) -> list[dict]:
    return page.evaluate("""async () => {
      const result = await axe.run(document, {resultTypes: ["violations"]});
      return result.violations.filter((v) => ["serious", "critical"].includes(v.impact))
        .map((v) => ({id: v.id, impact: v.impact, help: v.help,
                      nodes: v.nodes.slice(0, 4).map((n) => n.target.join(" "))}));
    }""")


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_axe_finds_nothing_serious(server, shots, scheme, viewport):
    size = "desktop" if viewport == DESKTOP else "phone"
    with chromium_browser() as browser:
        page, problems = new_page(browser, viewport=viewport, scheme=scheme)
        # injected by the test harness, not by the page: the page's CSP allows no such script
        page.context.add_init_script(path=str(AXE))
        open_chat(page, server.url)
        found = {"chat, welcome": axe_violations(page)}
        ids = seed(page, {"Axe": [("user", "check this"), ("assistant", RICH_REPLY)]})
        page.goto(f"{server.url}/c/{ids['Axe']}")
        expect(page.locator("pre code.hljs")).to_have_count(1)
        expect(page.locator(".body math")).to_have_count(2)
        found["chat, a conversation"] = axe_violations(page)
        if viewport == PHONE:
            page.get_by_test_id("sidebar-toggle").click()
            expect(page.get_by_test_id("new-chat")).to_be_visible()
            found["chat, drawer"] = axe_violations(page)
            page.keyboard.press("Escape")
        share = page.evaluate("""async (id) => (await (await fetch(`/api/conversations/${id}/share`,
          {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"})).json())""",
                              ids["Axe"])
        page.goto(share["url"])
        expect(page.get_by_test_id("message")).to_have_count(2)
        expect(page.locator(".body math")).to_have_count(2)
        shoot(page, shots, f"{size}-{scheme}-shared")
        found["shared"] = axe_violations(page)
        page.evaluate("""async (id) => fetch(`/api/conversations/${id}/share`, {method: "DELETE"})""",
                      ids["Axe"])
        response = page.goto(share["url"])
        assert response.status == 404
        expect(page.get_by_test_id("error-title")).to_have_text("This shared link no longer works")
        expect(page.get_by_test_id("error-message")).to_contain_text("revoked")
        shoot(page, shots, f"{size}-{scheme}-revoked")
        found["error"] = axe_violations(page)
        serious = {where: v for where, v in found.items() if v}
        assert serious == {}, json.dumps(serious, indent=1)
        assert problems == []


COMPOSER_CONTROLS = ('[data-testid="composer"], [data-testid="engine-select"], [data-testid="model-select"], '
                     '[data-testid="context-meter"], [data-testid="send"], [data-testid="backend-select"], '
                     '[data-testid="model-download"], [data-testid="browser-status-toggle"]')


@pytest.mark.parametrize("width", [320, 390, 430])
def test_the_phone_composer_fits_with_either_engine(server, shots, width):
    """Nothing in the composer (nor the browser engine's status) leaves a phone's viewport,
    whichever engine is picked, and the model picker keeps a readable width."""
    with chromium_browser() as browser:
        for scheme in ("light", "dark"):
            page, problems = new_page(browser, viewport={"width": width, "height": 800}, scheme=scheme)
            open_chat(page, server.url)
            for engine in ("server", "browser"):
                page.get_by_test_id("engine-select").select_option(engine)
                if engine == "browser":
                    expect(page.get_by_test_id("backend-select")).to_be_visible()
                boxes = page.evaluate("""(selector) => [...document.querySelectorAll(selector)]
                    .filter((el) => el.offsetParent !== null)
                    .map((el) => { const r = el.getBoundingClientRect();
                                   return {id: el.dataset.testid, left: r.left, right: r.right,
                                           width: r.width}; })""",
                                      COMPOSER_CONTROLS)
                shown = {b["id"] for b in boxes}
                assert shown >= {"composer", "engine-select", "model-select", "send"}, boxes
                outside = [b for b in boxes if b["left"] < 0 or b["right"] > width]
                assert not outside, f"{engine} at {width}px: {outside}"
                model = next(b for b in boxes if b["id"] == "model-select")
                assert model["width"] >= 90, f"the model picker shrank to {model['width']}px"
                assert page.evaluate("document.documentElement.scrollWidth") <= width
                shoot(page, shots, f"composer-{width}-{engine}-{scheme}")
            page.context.close()
            assert problems == []


def model_requests(page) -> list[str]:
    """The requests the page makes for model files (/models/...), from now on."""
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url) if "/models/" in request.url else None)
    return seen


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_picking_the_browser_engine_downloads_nothing_until_asked(server, shots, viewport):
    """Picking "This browser" moves no model bytes; Download shows the size, and with
    saveData on the page asks first in its own dialog: Cancel downloads nothing, confirming
    downloads it, and the status becomes a one-line chip that a tap opens."""
    with chromium_browser() as browser:
        for scheme in ("light", "dark"):
            page, problems = new_page(browser, viewport=viewport, scheme=scheme)
            page.add_init_script("Object.defineProperty(navigator, 'connection', "
                                 "{value: {saveData: true}, configurable: true})")
            requests = model_requests(page)
            open_chat(page, server.url)
            name = f"{'phone' if viewport == PHONE else 'desktop'}-{scheme}"
            page.get_by_test_id("engine-select").select_option("browser")
            download = page.get_by_test_id("model-download")
            expect(download).to_be_visible()
            expect(download).to_contain_text(re.compile(r"Download [\d.]+ (KiB|MiB)"))
            status_text = page.get_by_test_id("browser-status-text")
            expect(status_text).to_contain_text("downloaded once, when you ask")
            shoot(page, shots, f"download-offer-{name}")
            assert requests == [], "picking the engine downloaded the model"

            download.click()
            dialog = page.get_by_test_id("download-dialog")
            expect(dialog).to_be_visible()
            expect(dialog).to_contain_text("save data")
            shoot(page, shots, f"download-prompt-{name}")
            page.get_by_test_id("download-dialog-cancel").click()
            expect(dialog).to_have_count(0)
            assert requests == [], "a cancelled download moved bytes"

            # Enter with the model not downloaded asks too; Cancel keeps the message
            page.get_by_test_id("composer").fill("hello from the browser")
            page.get_by_test_id("composer").press("Enter")
            expect(dialog).to_be_visible()
            page.get_by_test_id("download-dialog-cancel").click()
            expect(page.get_by_test_id("error-text")).to_contain_text("Not sent")
            expect(page.get_by_test_id("composer")).to_have_value("hello from the browser")
            assert requests == []

            download.click()
            page.get_by_test_id("download-dialog-confirm").click()
            status = page.get_by_test_id("browser-status")
            expect(page.get_by_test_id("error")).to_be_hidden()  # "not sent" is old news now
            expect(status).to_have_attribute("data-state", "ready", timeout=60_000)
            assert requests and all(url.endswith(".gguf") for url in requests), requests
            # the ready status is a one-line chip; a tap shows the whole line
            expect(status).to_have_attribute("data-collapsed", "")
            height = status.bounding_box()["height"]
            assert height < 40, f"the ready chip is {height}px tall"
            shoot(page, shots, f"status-chip-{name}")
            page.get_by_test_id("browser-status-toggle").click()
            expect(status).not_to_have_attribute("data-collapsed", "")
            expect(page.get_by_test_id("browser-status-toggle")).to_have_attribute("aria-expanded", "true")
            page.context.close()
            assert problems == []
