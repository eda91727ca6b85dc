"""How long the sidebar's list takes with a semester of history: `GET /api/conversations`
(everything, as before paging) and its first page (`?limit=50`, what the page asks for), at
200 and 10,000 conversations of one visitor, in-process (Flask's test client, a fresh SQLite
file or a throwaway PostgreSQL cluster). A checkout without paging ignores ``limit``: its
"first page" line is the whole list.

    .venv/bin/python bench/list_speed.py [--database sqlite|postgresql] [--sizes 200,10000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def timed(client, path: str, runs: int) -> tuple[list[float], int, int]:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - began) * 1000)
        assert response.status_code == 200, response.get_data(as_text=True)[:200]
    return times, len(response.data), len(response.get_json()["conversations"])


def run(url: str, sizes: list[int], runs: int) -> None:
    from conftest import migrate

    from webapp import create_app
    from webapp.models import Conversation, new_public_id, utcnow

    migrate(url)
    app = create_app({"TESTING": True, "DATABASE_URL": url, "SECRET_KEY": "bench",
                      "MODEL_RUNNER": "inline"})
    try:
        client = app.test_client()
        client.get("/")
        with client.session_transaction() as session:
            owner = session["owner"]
        db, have, now = app.extensions["bchat"].db, 0, utcnow()
        for size in sizes:
            with db.write() as session:  # straight into the table: the list is what is timed
                session.execute(Conversation.__table__.insert(), [
                    {"public_id": new_public_id(), "owner_id": owner, "title": f"conversation {i}",
                     "created_at": now - timedelta(minutes=i), "updated_at": now - timedelta(minutes=i),
                     "source": "chat"} for i in range(have, size)])
            have = size
            for label, path in (("all", "/api/conversations"),
                                ("first page", "/api/conversations?limit=50")):
                times, size_bytes, count = timed(client, path, runs)
                print(f"{url.split(':')[0]:<10} {size:>6} conversations, {label:<10}: {count:>5} "
                      f"listed, {size_bytes / 1024:7.1f} KiB, median {statistics.median(times):6.1f} ms, "
                      f"p95 {statistics.quantiles(times, n=20)[18]:6.1f} ms ({runs} runs)", flush=True)
    finally:
        app.extensions["bchat"].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--sizes", default="200,10000")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.database == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            run(f"sqlite:///{tmp}/bench.sqlite3", sizes, args.runs)
    else:
        from pg import PostgresCluster

        cluster = PostgresCluster().start()
        try:
            run(cluster.create_database(), sizes, args.runs)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
