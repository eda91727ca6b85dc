"""How long `GET /api/conversations/<id>` takes on a large conversation tree, and an append to it.

It times what the page opened before windows (the whole tree) beside what it opens now: the
branch's last 50 messages (?limit=50, api.js MESSAGE_WINDOW) and the window above them
(?limit=50&before=<id>, loaded when scrolled to), with the size of each answer.

Builds a conversation of N messages (default 1,000) with branches — every 10th reply
regenerated, every 25th user message edited — in a fresh SQLite file (or a throwaway
PostgreSQL cluster's database, tests/pg.py), then times the JSON API in-process (Flask's
test client: the figure is the app's own work, no network).

    .venv/bin/python bench/tree_load.py [--messages 1000] [--runs 30] [--database postgresql]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    if args.database == "sqlite":
        tmp = Path(tempfile.mkdtemp(prefix="bchat-tree-"))
        measure(args, f"sqlite:///{tmp / 'tree.sqlite3'}", tmp)
        return
    from pg import PostgresCluster

    cluster = PostgresCluster().start()
    try:
        measure(args, cluster.create_database(), Path(tempfile.mkdtemp(prefix="bchat-tree-")))
    finally:
        cluster.stop()


def measure(args: argparse.Namespace, url: str, tmp: Path) -> None:

    from conftest import migrate
    from tiny_model import write_tiny_model

    from webapp import create_app
    from webapp.models import Provenance

    migrate(url)
    app = create_app({"DATABASE_URL": url, "MODEL_PATH": str(write_tiny_model(tmp / "t.gguf")),
                      "SECRET_KEY": "bench", "TESTING": True})
    services = app.extensions["bchat"]
    chats = services.chats
    client = app.test_client()
    client.get("/")
    with client.session_transaction() as session:
        owner = session["owner"]

    started = time.perf_counter()
    conv, _ = chats.add_user_message(owner, None, "the first question")
    cid = conv["id"]
    count = 1
    turn = 0
    while count < args.messages:
        turn += 1
        reply = chats.add_reply(owner, cid, f"answer {turn} " * 20, "complete",
                                Provenance(engine="browser", model="tiny-chat"))
        count += 1
        if turn % 10 == 0 and count < args.messages:  # a regenerated sibling
            chats.add_reply(owner, cid, f"another answer {turn} " * 20, "complete",
                            Provenance(engine="browser", model="tiny-chat"),
                            parent_id=reply["parent_id"])
            count += 1
        if count >= args.messages:
            break
        user = chats.add_user_message(owner, cid, f"question {turn}")[1]
        count += 1
        if turn % 25 == 0 and count < args.messages:  # an edited prompt beside it
            chats.add_user_message(owner, cid, f"question {turn}, edited", parent_id=user["parent_id"])
            count += 1
    built = time.perf_counter() - started

    times = []
    for _ in range(args.runs):
        began = time.perf_counter()
        response = client.get(f"/api/conversations/{cid}")
        times.append((time.perf_counter() - began) * 1000)
        assert response.status_code == 200
    body = response.get_json()
    branch, node = 0, body["current_message_id"]
    by_id = {m["id"]: m for m in body["messages"]}
    while node:
        branch += 1
        node = by_id[node]["parent_id"]
    earlier = client.get(f"/api/conversations/{cid}?limit=50").get_json()["earlier"]
    windows = {}
    for name, query in (("?limit=50", "?limit=50"),
                        ("?limit=50&before=<id>", f"?limit=50&before={earlier}")):
        took = []
        for _ in range(args.runs):
            began = time.perf_counter()
            answer = client.get(f"/api/conversations/{cid}{query}")
            took.append((time.perf_counter() - began) * 1000)
            assert answer.status_code == 200
        windows[name] = (took, len(answer.data), len(answer.get_json()["messages"]))
    # An append to the long conversation, through the API (what the page's engine posts):
    # its cost should not grow with the conversation.
    appends = []
    for i in range(args.runs):
        began = time.perf_counter()
        posted = client.post(f"/api/conversations/{cid}/messages",
                             json={"role": "user", "content": f"one more {i}"})
        appends.append((time.perf_counter() - began) * 1000)
        assert posted.status_code == 201
    services.close()
    print(f"tree of {len(body['messages'])} messages (current branch {branch} long), "
          f"{len(response.data) / 1024:.0f} KiB of JSON, built in {built:.1f} s")
    print(f"GET /api/conversations/<id>: median {statistics.median(times):.1f} ms, "
          f"p95 {statistics.quantiles(times, n=20)[18]:.1f} ms, min {min(times):.1f} ms "
          f"({args.runs} runs, in-process)")
    for name, (took, size, sent) in windows.items():
        print(f"GET /api/conversations/<id>{name}: median {statistics.median(took):.1f} ms, "
              f"p95 {statistics.quantiles(took, n=20)[18]:.1f} ms, {size / 1024:.0f} KiB "
              f"({sent} messages with siblings)")
    print(f"POST /api/conversations/<id>/messages to it: median {statistics.median(appends):.1f} ms, "
          f"p95 {statistics.quantiles(appends, n=20)[18]:.1f} ms ({args.runs} runs, in-process)")


if __name__ == "__main__":
    main()
