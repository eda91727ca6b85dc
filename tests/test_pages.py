"""How pages and their static files are delivered: versioned URLs cached for a year, gzip,
modulepreload for the whole module graph, and styled error pages (JSON for the API)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
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
    # the module graph is preloaded (no import waterfall) by the versioned URLs the import map
    # sends the imports to, and the browser engine is not in it
    preloaded = [u.split("?v=")[0] for u in re.findall(r'rel="modulepreload" href="([^"]+)"', page)]
    assert "/static/js/render.js" in preloaded and "/static/vendor/marked/marked.esm.js" in preloaded
    assert not [u for u in preloaded if "wllama" in u or "engines/browser.js" in u]
    assert re.findall(r'rel="modulepreload" href="[^"?]+"', page) == []  # none unversioned


def test_the_import_map_versions_every_module_and_the_csp_allows_only_it(client):
    response = client.get("/")
    page = response.get_data(as_text=True)
    found = re.search(r'<script type="importmap">(.*?)</script>', page)
    imports = json.loads(found.group(1))["imports"]
    for plain in ("/static/js/render.js", "/static/js/ui/messages.js", "/static/vendor/katex/katex.mjs",
                  "/static/vendor/wllama/index.js", "/static/vendor/highlight/highlight.min.js"):
        assert re.fullmatch(re.escape(plain) + r"\?v=[0-9a-f]{12}", imports[plain]), plain
        assert client.get(imports[plain]).headers["Cache-Control"].endswith("immutable")
    # before any module script: a module fetched before the map is read would bypass it
    assert page.index('type="importmap"') < page.index('type="module"')
    assert page.index('type="importmap"') < page.index('rel="modulepreload"')
    digest = base64.b64encode(hashlib.sha256(found.group(1).encode()).digest()).decode()
    policy = response.headers["Content-Security-Policy"]
    script_src = next(p for p in policy.split("; ") if p.startswith("script-src"))
    assert script_src == f"script-src 'self' 'wasm-unsafe-eval' 'sha256-{digest}'"
    assert "unsafe-inline" not in policy


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
def test_a_plain_url_revalidates_to_304_with_the_tag_it_was_served(client, encoding):
    """Module URLs without ?v= (and the wasm) are no-cache: each visit asks If-None-Match.
    The gzip bytes carry their own tag; it must match on the next visit, or every module
    travels again in full."""
    url = "/static/js/render.js"
    first = client.get(url, headers={"Accept-Encoding": encoding})
    assert first.status_code == 200 and first.headers["Cache-Control"] == "no-cache"
    assert (first.headers.get("Content-Encoding") == "gzip") == (encoding == "gzip")
    etag = first.headers["ETag"]
    again = client.get(url, headers={"Accept-Encoding": encoding, "If-None-Match": etag})
    assert again.status_code == 304 and again.get_data() == b""
    assert again.headers["ETag"] == etag and "Accept-Encoding" in again.headers["Vary"]
    assert again.headers["Cache-Control"] == "no-cache"
    # the same for everyone: no session cookie, no Vary: Cookie (a refreshed cookie would make
    # every cached copy stale on the next visit)
    assert "Set-Cookie" not in first.headers and "Cookie" not in first.headers["Vary"]
    weak = client.get(url, headers={"Accept-Encoding": encoding, "If-None-Match": f"W/{etag}, \"other\""})
    assert weak.status_code == 304  # If-None-Match compares weakly (RFC 9110 13.1.2)
    if encoding == "gzip":  # a client holding gzip bytes that no longer takes gzip: plain bytes
        crossed = client.get(url, headers={"Accept-Encoding": "identity", "If-None-Match": etag})
        assert crossed.status_code == 200 and b"renderMarkdown" in crossed.get_data()
    # a changed tag (the file changed) gets the new bytes
    stale = client.get(url, headers={"Accept-Encoding": encoding, "If-None-Match": '"1-2-3-gzip"'})
    assert stale.status_code == 200 and stale.get_data()


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


def test_the_webassembly_by_its_plain_url_revalidates_to_304(client):
    """browser.js fetches wllama's .wasm by its plain URL: a repeat visit must get a 304."""
    url = "/static/vendor/wllama/wllama.wasm"
    first = client.get(url, headers={"Accept-Encoding": "gzip"})
    assert first.status_code == 200 and "Content-Encoding" not in first.headers  # already compressed
    again = client.get(url, headers={"Accept-Encoding": "gzip", "If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and again.get_data() == b""
