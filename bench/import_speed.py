"""How long a conversation import takes, and what it costs another visitor's writes meanwhile.

For each size (2,000 and 10,000 messages by default: a branching tree, as an export writes it)
it imports the file through the JSON API (Flask's test client, the app's real database code),
while another visitor posts messages to a conversation of its own from a second thread as
fast as it can; it prints the import's time and the other visitor's write latencies (p50,
max) and statuses: every one should be 201.

    .venv/bin/python bench/import_speed.py                      # SQLite, 2000 and 10000
    .venv/bin/python bench/import_speed.py --database postgresql --sizes 10000

``sqlite`` uses a temp file; ``postgresql`` starts a throwaway cluster (tests/pg.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def export_file(count: int) -> dict:
    """A version 2 export of ``count`` messages: a main branch of alternating turns with a
    regenerated reply (a sibling) every tenth message, so the tree is not one line."""
    messages, parent = [], None
    for i in range(count):
        role = "user" if i % 2 == 0 else "assistant"
        if role == "assistant" and i % 10 == 9 and messages:
            sibling_parent = messages[-1]["parent_id"]  # another reply to the same question
            messages.append({"id": f"m{i}", "parent_id": sibling_parent, "role": role,
                             "content": f"an earlier reply {i} " + "x" * 120, "status": "complete"})
            continue
        messages.append({"id": f"m{i}", "parent_id": parent, "role": role,
                         "content": f"message {i} " + "y" * 150, "status": "complete"})
        parent = f"m{i}"
    return {"format": "bchat.conversation", "version": 2,
            "conversation": {"title": f"{count} messages", "current_message_id": parent},
            "messages": messages}


def measure(app, url: str, size: int) -> None:
    body = json.dumps(export_file(size)).encode()
    importer, writer = app.test_client(), app.test_client()
    conv_id = writer.post("/api/conversations", json={"title": "meanwhile"}).get_json()["id"]
    done = threading.Event()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()

    def write_meanwhile() -> None:
        while not done.is_set():
            began = time.perf_counter()
            response = writer.post(f"/api/conversations/{conv_id}/messages",
                                   json={"role": "user", "content": "still here"})
            latencies.append(time.perf_counter() - began)
            statuses[response.status_code] += 1

    other = threading.Thread(target=write_meanwhile)
    other.start()
    began = time.perf_counter()
    response = importer.post("/api/conversations/import", data=body,
                             content_type="application/json")
    elapsed = time.perf_counter() - began
    done.set()
    other.join()
    assert response.status_code == 201, response.get_data(as_text=True)[:300]
    assert len(response.get_json()["messages"]) == size
    print(f"{url.split(':')[0]:<10} {size:>6} messages ({len(body) / 1e6:.1f} MB): "
          f"import {elapsed:.2f} s ({size / elapsed:,.0f} messages/s); another "
          f"visitor's {len(latencies)} writes meanwhile: p50 "
          f"{statistics.median(latencies) * 1000:.0f} ms, max "
          f"{max(latencies) * 1000:.0f} ms, statuses {dict(statuses)}", flush=True)


def run(url: str, sizes: list[int]) -> None:
    from conftest import migrate

    from webapp import create_app

    migrate(url)
    app = create_app({"TESTING": True, "DATABASE_URL": url, "SECRET_KEY": "bench",
                      "MODEL_RUNNER": "inline", "MAX_UPLOAD_BYTES": 64 * 1024 * 1024})
    try:
        for size in sizes:
            measure(app, url, size)
    finally:
        app.extensions["bchat"].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--sizes", default="2000,10000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.database == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            run(f"sqlite:///{tmp}/bench.sqlite3", sizes)
    else:
        from pg import PostgresCluster

        cluster = PostgresCluster().start()
        try:
            run(cluster.create_database(), sizes)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
