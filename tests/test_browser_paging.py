"""The sidebar loads the conversation list a page at a time as it scrolls (api.js LIST_PAGE),
its date groups whole across pages, in chromium."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from browser import chromium_browser
from playwright.sync_api import expect

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("viewport, scheme", [({"width": 1366, "height": 850}, "light"),
                                              ({"width": 390, "height": 844}, "dark")])
def test_the_sidebar_loads_more_conversations_as_it_scrolls(live_server, tmp_path, viewport, scheme):
    shots = Path(os.environ.get("BCHAT_SCREENSHOTS") or tmp_path)
    with chromium_browser() as browser:
        context = browser.new_context(viewport=viewport, color_scheme=scheme)
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
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
        assert not problems
