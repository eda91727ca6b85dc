"""A repeat visit in chromium with its HTTP cache on: no script or stylesheet body travels again.

The import map (webapp/assets.py) sends every module import to a ``?v=<hash>`` URL that is
cached for a year, so a second visit asks the server for none of them; anything still fetched by
a plain URL must come back 304. Counted at the server, below Flask: what actually went over the
wire, whatever the browser reports.
"""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

import pytest
from browser import chromium
from playwright.sync_api import expect

pytestmark = pytest.mark.browser


class Counter:
    """WSGI middleware: (path with query, status) of every request the server answered."""

    def __init__(self, wsgi_app) -> None:
        self.wsgi_app = wsgi_app
        self.seen: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        query = environ.get("QUERY_STRING")
        path = environ.get("PATH_INFO", "") + (f"?{query}" if query else "")

        def recording(status, headers, exc_info=None):
            with self.lock:
                self.seen.append((path, int(status.split()[0])))
            return start_response(status, headers, exc_info)

        return self.wsgi_app(environ, recording)

    def take(self) -> list[tuple[str, int]]:
        with self.lock:
            seen, self.seen = self.seen, []
        return seen


def is_code(path: str) -> bool:
    return urlsplit(path).path.endswith((".js", ".mjs", ".css"))


def visit(context, url: str) -> None:
    page = context.new_page()
    page.goto(url)
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    expect(page.get_by_test_id("model-select")).not_to_have_value("")
    page.wait_for_load_state("networkidle")
    page.close()


def test_a_repeat_visit_fetches_no_script_or_stylesheet_again(app, make_live_server):
    counter = Counter(app.wsgi_app)
    app.wsgi_app = counter
    server = make_live_server(app)
    with chromium() as context:
        visit(context, server.url + "/")
        first = counter.take()
        code = [(p, s) for p, s in first if is_code(p)]
        assert len(code) >= 20, first  # the whole module graph came, and was counted
        # every module, the ones reached by relative imports included, came by a versioned URL
        assert [p for p, _ in code if "?v=" not in p] == []
        assert {s for _, s in code} == {200}

        visit(context, server.url + "/")
        second = counter.take()
        assert any(urlsplit(p).path == "/" for p, _ in second)  # the page itself was asked for
        bodies_again = [(p, s) for p, s in second if urlsplit(p).path.startswith("/static/") and s != 304]
        assert bodies_again == [], f"sent again in full on a repeat visit: {bodies_again}"
