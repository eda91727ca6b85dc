"""Bytes a first visit transfers before a model is chosen, and how soon the page is usable.

Starts bchat on a temporary database with the tests' tiny model, opens the chat page in
Debian's chromium with an empty cache, waits until the page says "connected" and the model list
is filled, and sums what came over the wire (compressed bytes, as Chromium counts them) per
kind of resource. Also reports the time to interactive: navigation start to the page's own
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


def measure() -> dict:
    from browser import chromium
    from conftest import LiveServer, migrate
    from playwright.sync_api import expect
    from tiny_model import write_tiny_model

    from webapp import create_app

    tmp = Path(tempfile.mkdtemp())
    url = f"sqlite:///{tmp}/bench.sqlite3"
    migrate(url)
    model = write_tiny_model(tmp / "tiny-chat.gguf")
    app = create_app({"DATABASE_URL": url, "MODEL_PATH": str(model), "SECRET_KEY": "bench"})
    server = LiveServer(app)
    by_kind: dict[str, int] = defaultdict(int)
    files: list[tuple[int, int, str]] = []
    try:
        with chromium() as context:
            page = context.new_page()
            cdp = context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
            kinds: dict[str, tuple[str, str]] = {}
            decoded: dict[str, int] = defaultdict(int)

            def on_response(event):
                kinds[event["requestId"]] = (event["type"], event["response"]["url"])

            def on_data(event):
                decoded[event["requestId"]] += event["dataLength"]

            def on_finished(event):
                kind, address = kinds.get(event["requestId"], ("Other", "?"))
                by_kind[kind] += int(event["encodedDataLength"])
                files.append((int(event["encodedDataLength"]), decoded[event["requestId"]], address))

            cdp.on("Network.responseReceived", on_response)
            cdp.on("Network.dataReceived", on_data)
            cdp.on("Network.loadingFinished", on_finished)
            page.goto(server.url + "/")
            expect(page.get_by_test_id("connection")).to_have_text("connected")
            expect(page.get_by_test_id("model-select")).not_to_have_value("")
            page.wait_for_function(
                "() => performance.getEntriesByName('bchat:interactive').length > 0")
            interactive_ms = page.evaluate(
                "performance.getEntriesByName('bchat:interactive')[0].startTime")
            connected_ms = page.evaluate("performance.now()")  # an upper bound for the socket
            page.wait_for_load_state("networkidle")
            page.close()
    finally:
        server.stop()
        app.extensions["bchat"].close()
    return {"by_kind": dict(by_kind), "files": files, "interactive_ms": interactive_ms,
            "connected_ms": connected_ms}


def main() -> int:
    result = measure()
    files = sorted(result["files"], reverse=True)
    print(f"{'on the wire':>12} {'decoded':>10}  resource")
    for wire, raw, address in files:
        print(f"{wire:>12,} {raw:>10,}  {address.split('/', 3)[-1]}")
    kinds = result["by_kind"]
    js_css = kinds.get("Script", 0) + kinds.get("Stylesheet", 0)
    print()
    for kind, size in sorted(kinds.items()):
        print(f"{kind:>12}: {size / 1024:8.1f} KB")
    print(f"JS + CSS on the wire before a model is chosen: {js_css / 1024:.1f} KB (budget 200 KB)")
    print(f"interactive after {result['interactive_ms']:.0f} ms from navigation start (models and "
          "conversations listed, composer focused; budget 300 ms on loopback)")
    print(f"socket seen connected by {result['connected_ms']:.0f} ms (Playwright's polling included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
