"""A burst of ``resume`` frames for a reply the page writes (browser engine), and what it costs.

One visitor has a browser-engine reply still streaming and sends N ``resume`` frames for it on
one socket; meanwhile another visitor times plain writes (new conversations). Prints how long
the socket took to get through the burst, the process's thread count before, after the burst
and after the socket closed, and the other visitor's write times before and after the burst.
Issue 20 measured 12 → 154 → 213 threads and 20× slower writes for 1,000 frames, before each
socket reused one follower per reply.

    .venv/bin/python bench/resume_burst.py [--frames 1000] [--writes 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import LiveServer, migrate  # noqa: E402
from tiny_model import write_tiny_model  # noqa: E402

from webapp import create_app  # noqa: E402


def write_times(visitor, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        status, _ = visitor.json("POST", "/api/conversations", {})
        assert status == 201, status
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--writes", type=int, default=40)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    url = f"sqlite:///{folder / 'bench.sqlite3'}"
    migrate(url)
    model = write_tiny_model(folder / "tiny-chat.gguf")
    app = create_app({"DATABASE_URL": url, "MODEL_PATH": str(model), "SECRET_KEY": "bench",
                      "MODEL_RUNNER": "inline"})
    server = LiveServer(app)
    try:
        page, other = server.session(), server.session()
        page.visit()
        other.visit()
        _, conv = page.json("POST", "/api/conversations", {})
        path = f"/api/conversations/{conv['id']}/messages"
        page.json("POST", path, {"role": "user", "content": "hi"})
        _, reply = page.json("POST", path, {
            "role": "assistant", "content": "so far", "status": "streaming",
            "provenance": {"engine": "browser", "backend": "wasm-st", "model": "tiny-chat"}})
        quiet = write_times(other, args.writes)
        ws = page.ws()
        ws.send({"type": "ping"})
        ws.until("pong")
        before = threading.active_count()
        burst_started = time.perf_counter()
        for _ in range(args.frames):
            ws.send({"type": "resume", "message_id": reply["id"], "offset": 0})
        ws.send({"type": "ping"})
        ws.until("pong")
        burst_seconds = time.perf_counter() - burst_started
        after_burst = threading.active_count()
        busy = write_times(other, args.writes)
        ws.close()
        followers = [t for t in threading.enumerate() if t.name == "bchat-run-follow"]
        for thread in followers:
            thread.join(10)
        after_close = threading.active_count()
        print(f"{args.frames} resume frames on one socket, answered in {burst_seconds:.2f} s")
        print(f"threads: {before} before, {after_burst} after the burst, {after_close} after the "
              f"socket closed ({len(followers)} followers were running)")
        print(f"another visitor's writes (ms): p50 {statistics.median(quiet):.1f} quiet, "
              f"{statistics.median(busy):.1f} after the burst; max {max(quiet):.1f} / {max(busy):.1f}")
    finally:
        server.stop()
        app.extensions["bchat"].close()


if __name__ == "__main__":
    main()
