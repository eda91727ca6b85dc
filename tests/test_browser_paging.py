"""The sidebar loads the conversation list a page at a time as it scrolls (api.js LIST_PAGE),
its date groups whole across pages, in chromium."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("viewport, scheme", [({"width": 1366, "height": 850}, "light"),
                                              ({"width": 390, "height": 844}, "dark")])
def test_the_sidebar_loads_more_conversations_as_it_scrolls(live_server, pages, shots, viewport, scheme):
    page = pages(viewport, scheme)  # page errors fail the test (conftest)
    page.goto(live_server.url + "/")
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    page.evaluate("""async () => {
      for (let i = 0; i < 120; i++) {
        await fetch("/api/conversations", {method: "POST", body: JSON.stringify({title: `c${i}`}),
          headers: {"Content-Type": "application/json"}});
      }
    }""")
    first_page: list[str] = []
    page.on("request", lambda r: urlsplit(r.url).path == "/api/conversations"
            and r.method == "GET" and first_page.append(r.url))
    page.reload()
    items = page.get_by_test_id("conversation")
    expect(items).to_have_count(50)
    # the first load (boot.js's prefetch) asks for one page, not the whole list
    assert first_page and all("limit=50" in url for url in first_page), first_page
    more = page.get_by_test_id("list-more")
    expect(more).to_have_text("Loading more…")
    if viewport["width"] < 600:
        page.get_by_test_id("sidebar-toggle").click()  # the phone's drawer holds the list
    page.screenshot(path=str(shots / f"list-page-{viewport['width']}-{scheme}.png"))
    for shown in (100, 120):
        more.scroll_into_view_if_needed()
        expect(items).to_have_count(shown)
    expect(more).to_have_count(0)
    titles = items.locator(".conversation-title").all_text_contents()
    assert titles == [f"c{i}" for i in reversed(range(120))], "newest first, each once"
    headings = page.get_by_test_id("conversation-list").locator(".list-heading")
    expect(headings).to_have_text(["Today"])  # one group, not one a page
    page.screenshot(path=str(shots / f"list-all-{viewport['width']}-{scheme}.png"))


# A 300-message conversation (m0 … m299, one branch) with a second version of m2 ("m2 edited",
# answered by "side reply"), opened on the long branch.
LONG = """async () => {
  const messages = [];
  for (let i = 0; i < 300; i++) {
    messages.push({id: `m${i}`, parent_id: i ? `m${i - 1}` : null,
                   role: i % 2 ? "assistant" : "user", content: `m${i}`});
  }
  messages.push({id: "e2", parent_id: "m1", role: "user", content: "m2 edited"},
                {id: "e3", parent_id: "e2", role: "assistant", content: "side reply"});
  const response = await fetch("/api/conversations/import", {method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({format: "bchat.conversation", version: 2,
                          conversation: {title: "long", current_message_id: "m299"}, messages})});
  return (await response.json()).id;
}"""


def by_text(page, text: str):
    """The message whose text is exactly ``text`` (an import gives messages new ids)."""
    return page.get_by_test_id("message").filter(has=page.locator(".body").get_by_text(text, exact=True))


@pytest.mark.parametrize("viewport, scheme", [({"width": 1366, "height": 850}, "light"),
                                              ({"width": 390, "height": 844}, "dark")])
def test_a_long_conversation_opens_on_its_last_messages_and_loads_the_rest_as_it_scrolls(
        live_server, pages, shots, viewport, scheme):
    page = pages(viewport, scheme)  # page errors fail the test (conftest)
    page.goto(live_server.url + "/")
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    conversation = page.evaluate(LONG)
    asked: list[str] = []
    page.on("request", lambda r: f"/api/conversations/{conversation}" in r.url
            and r.method == "GET" and asked.append(urlsplit(r.url).query))
    page.goto(f"{live_server.url}/c/{conversation}")
    messages = page.get_by_test_id("message")
    expect(messages).to_have_count(50)
    assert asked == ["limit=50"], "the first load asks for one window, not the whole tree"
    expect(messages.last.locator(".body")).to_have_text("m299")
    expect(messages.first.locator(".body")).to_have_text("m250")
    page.screenshot(path=str(shots / f"window-{viewport['width']}-{scheme}.png"))

    # Scrolling to the top loads the window above; what was on screen stays in place. The
    # first try fails (the network drops it): the top says so, and scrolling back tries again.
    scroller = page.get_by_test_id("scroller")
    kept = by_text(page, "m250")
    dropped: list[str] = []
    page.route(lambda url: "before=" in url,
               lambda route: route.continue_() if dropped else (dropped.append(route.request.url),
                                                                route.abort()))
    scroller.evaluate("(node) => { node.scrollTop = 0; }")
    earlier = page.get_by_test_id("messages-earlier")
    expect(earlier).to_contain_text("Could not load earlier messages")
    page.screenshot(path=str(shots / f"window-failed-{viewport['width']}-{scheme}.png"))
    scroller.evaluate("(node) => { node.scrollTop = node.scrollHeight; }")
    expect(earlier).not_to_be_in_viewport()
    scroller.evaluate("(node) => { node.scrollTop = 0; }")
    expect(messages).to_have_count(100)
    assert kept.evaluate("(node) => node.getBoundingClientRect().top") >= 0, "m250 still on screen"
    assert scroller.evaluate("(node) => node.scrollTop") > 0, "the reader's place kept"
    page.screenshot(path=str(shots / f"window-earlier-{viewport['width']}-{scheme}.png"))
    for shown in (150, 200, 250, 300):
        scroller.evaluate("(node) => { node.scrollTop = 0; }")
        expect(messages).to_have_count(shown)
    expect(earlier).to_have_count(0)
    texts = [text.strip() for text in messages.locator(".body").all_text_contents()]
    assert texts == [f"m{i}" for i in range(300)], "every message once, in order"
    assert len(asked) == 7 and all("limit=50&before=" in query for query in asked[1:])

    # The switcher on an early message: the other version's branch was never sent; it is
    # fetched when switched to, and the way back fetches the long branch's windows again.
    early = by_text(page, "m2")
    expect(early.get_by_test_id("branch-pos")).to_have_text("1/2")
    early.get_by_test_id("branch-next").click()
    expect(messages.locator(".body")).to_have_text(["m0", "m1", "m2 edited", "side reply"])
    edited = by_text(page, "m2 edited")
    expect(edited.get_by_test_id("branch-pos")).to_have_text("2/2")
    page.screenshot(path=str(shots / f"window-switched-{viewport['width']}-{scheme}.png"))
    edited.get_by_test_id("branch-prev").click()
    expect(messages).to_have_count(300)
    expect(early.get_by_test_id("branch-pos")).to_have_text("1/2")
    assert [t.strip() for t in messages.locator(".body").all_text_contents()] == texts
    assert early.evaluate("(node) => node.getBoundingClientRect().top") < viewport["height"], \
        "the version switched to stays on screen"
