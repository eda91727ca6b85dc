"""How pages and their static files are delivered: versioned URLs cached for a year, gzip,
modulepreload for the whole module graph, and styled error pages (JSON for the API)."""

from __future__ import annotations

import gzip
import re

import pytest

pytestmark = pytest.mark.databases("sqlite", "postgresql")


def test_static_files_are_versioned_cached_and_compressed(client):
    page = client.get("/").get_data(as_text=True)
    css = re.search(r'href="(/static/css/app\.css\?v=[0-9a-f]{12})"', page).group(1)
    app_js = re.search(r'src="(/static/js/app\.js\?v=[0-9a-f]{12})"', page).group(1)
    response = client.get(css, headers={"Accept-Encoding": "gzip, br"})
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert response.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in response.headers["Vary"]
    plain = client.get(css).get_data()  # no Accept-Encoding: the bytes as they are
    assert gzip.decompress(response.get_data()) == plain
    assert len(response.get_data()) < len(plain) / 2
    # a stale or missing version is not cached for good: the next visit asks again
    for url in (css.split("?")[0], css.split("=")[0] + "=000000000000", "/static/js/api.js"):
        assert client.get(url).headers["Cache-Control"] == "no-cache", url
    assert client.get(app_js, headers={"Accept-Encoding": "gzip"}).headers["Content-Encoding"] == "gzip"
    # the module graph is preloaded (no import waterfall), and the browser engine is not in it
    preloaded = re.findall(r'rel="modulepreload" href="([^"]+)"', page)
    assert "/static/js/render.js" in preloaded and "/static/vendor/marked/marked.esm.js" in preloaded
    assert not [u for u in preloaded if "wllama" in u or "engines/browser.js" in u]


def test_a_range_request_for_a_static_file_is_left_alone(client):
    response = client.get("/static/js/app.js", headers={"Accept-Encoding": "gzip", "Range": "bytes=0-9"})
    assert response.status_code == 206 and "Content-Encoding" not in response.headers
    assert len(response.get_data()) == 10


def test_error_pages_are_styled_for_people_and_json_for_programs(client):
    page = client.get("/no/such/page", headers={"Accept": "text/html"})
    assert page.status_code == 404 and page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    assert 'data-testid="error-page"' in text and "Nothing here" in text
    assert "Content-Security-Policy" in page.headers
    api = client.get("/api/no-such-thing")
    assert api.status_code == 404 and api.get_json()["error"]["code"] == "not_found"
    programs = client.get("/no/such/page", headers={"Accept": "application/json"})
    assert programs.get_json()["error"]["code"] == "not_found"


def test_a_revoked_or_unknown_share_says_so(client):
    response = client.get("/s/not-a-real-token")
    assert response.status_code == 404
    text = response.get_data(as_text=True)
    assert "This shared link no longer works" in text and "revoked" in text
    assert response.headers["X-Robots-Tag"] == "noindex, nofollow"
