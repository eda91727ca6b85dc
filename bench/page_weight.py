"""Bytes a first and a repeat visit transfer before a model is chosen, and how soon the page
is usable.

Starts bchat on a temporary database with the tests' tiny model, opens the chat page in
Debian's chromium with an empty cache, waits until the page says "connected" and the model list
is filled, and sums what came over the wire (compressed bytes, as Chromium counts them) per
kind of resource. Then opens the page again in the same browser, its HTTP cache now warm, and
sums again: versioned files come from the cache without a request, anything else should be a
bodiless 304. Also reports the time to interactive: navigation start to the page's own
"bchat:interactive" mark (models and conversations listed, composer focused). Printed, not
asserted: the issue's budget is 200 KB of JS+CSS and 300 ms on loopback.

    .venv/bin/python bench/page_weight.py
"""

from __future__ import annotations

import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def visit(context, url: str) -> dict:
    """One visit in a new tab: bytes per kind of resource and per file, as the wire saw them."""
    from playwright.sync_api import expect

    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    by_kind: dict[str, int] = defaultdict(int)
    files: list[tuple[int, int, int, str]] = []
    kinds: dict[str, tuple[str, str, int]] = {}
    decoded: dict[str, int] = defaultdict(int)

    def on_response(event):
        response = event["response"]
        kinds[event["requestId"]] = (event["type"], response["url"], response["status"])

    def on_data(event):
        decoded[event["requestId"]] += event["dataLength"]

    def on_finished(event):
        kind, address, status = kinds.get(event["requestId"], ("Other", "?", 0))
        by_kind[kind] += int(event["encodedDataLength"])
        files.append((int(event["encodedDataLength"]), decoded[event["requestId"]], status, address))

    cdp.on("Network.responseReceived", on_response)
    cdp.on("Network.dataReceived", on_data)
    cdp.on("Network.loadingFinished", on_finished)
    page.goto(url)
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    expect(page.get_by_test_id("model-select")).not_to_have_value("")
    page.wait_for_function("() => performance.getEntriesByName('bchat:interactive').length > 0")
    interactive_ms = page.evaluate("performance.getEntriesByName('bchat:interactive')[0].startTime")
    connected_ms = page.evaluate("performance.now()")  # an upper bound for the socket
    page.wait_for_load_state("networkidle")
    page.close()
    return {"by_kind": dict(by_kind), "files": files, "interactive_ms": interactive_ms,
            "connected_ms": connected_ms}


def measure() -> tuple[dict, dict]:
    from browser import chromium
    from conftest import LiveServer, migrate
    from tiny_model import write_tiny_model

    from webapp import create_app

    tmp = Path(tempfile.mkdtemp())
    url = f"sqlite:///{tmp}/bench.sqlite3"
    migrate(url)
    model = write_tiny_model(tmp / "tiny-chat.gguf")
    app = create_app({"DATABASE_URL": url, "MODEL_PATH": str(model), "SECRET_KEY": "bench"})
    server = LiveServer(app)
    try:
        with chromium() as context:  # a fresh profile: the first visit starts with an empty cache
            first = visit(context, server.url + "/")
            repeat = visit(context, server.url + "/")
    finally:
        server.stop()
        app.extensions["bchat"].close()
    return first, repeat


def report(title: str, result: dict) -> int:
    print(f"\n{title}")
    print(f"{'on the wire':>12} {'decoded':>10} {'status':>6}  resource")
    for wire, raw, status, address in sorted(result["files"], reverse=True):
        print(f"{wire:>12,} {raw:>10,} {status:>6}  {address.split('/', 3)[-1]}")
    kinds = result["by_kind"]
    for kind, size in sorted(kinds.items()):
        print(f"{kind:>12}: {size / 1024:8.1f} KB")
    js_css = kinds.get("Script", 0) + kinds.get("Stylesheet", 0)
    print(f"interactive after {result['interactive_ms']:.0f} ms from navigation start (models and "
          "conversations listed, composer focused; budget 300 ms on loopback)")
    print(f"socket seen connected by {result['connected_ms']:.0f} ms (Playwright's polling included)")
    return js_css


def main() -> int:
    first, repeat = measure()
    first_code = report("First visit (empty cache)", first)
    repeat_code = report("Repeat visit (same browser, cache warm)", repeat)
    print()
    print(f"first visit:  JS + CSS {first_code / 1024:.1f} KB (budget 200 KB), "
          f"everything {sum(first['by_kind'].values()) / 1024:.1f} KB")
    print(f"repeat visit: JS + CSS {repeat_code / 1024:.1f} KB, "
          f"everything {sum(repeat['by_kind'].values()) / 1024:.1f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
