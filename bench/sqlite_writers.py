"""SQLite under many writers in one process: which writer path is fastest?

Three ways for T threads of one process to write (each write is a real append through
ChatService: the user's message in its own transaction, as the API does), on one SQLite file:

- ``file-lock``:     every thread begins its own ``BEGIN IMMEDIATE`` and meets the others on
                     SQLite's busy handler (it sleeps and polls; unfair under contention)
- ``gate``:          bchat's path (db.FairGate): threads queue in arrival order in the process,
                     then take the file lock; other processes still meet on the busy handler
- ``writer-thread``: Datasette's shape: every write is handed to one thread that owns the
                     writes, and the caller waits for its result

Rounds alternate between the paths so a neighbour's load falls on all of them alike. Prints,
per path: writes/s, and the p50/p99 of what a caller waited (queue included).

    .venv/bin/python bench/sqlite_writers.py [--threads 8,32] [--writes 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PATHS = ("file-lock", "gate", "writer-thread")


def run(path: str, threads: int, writes: int) -> tuple[float, list[float]]:
    from conftest import migrate

    from webapp.chats import ChatService
    from webapp.db import Database

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/writers.sqlite3"
        migrate(url)
        db = Database(url, queue_writers=path != "file-lock")
        chats = ChatService(db, max_message_chars=100_000)
        conversations = [chats.add_user_message("bench", None, f"start {t}")[0]["id"]
                         for t in range(threads)]
        writer = ThreadPoolExecutor(max_workers=1) if path == "writer-thread" else None
        waits: list[float] = []
        lock = threading.Lock()
        go = threading.Barrier(threads + 1)

        def append(t: int, i: int) -> None:
            chats.add_user_message("bench", conversations[t], f"message {i} of thread {t}")

        def worker(t: int) -> None:
            mine = []
            go.wait()
            for i in range(writes):
                started = time.perf_counter()
                if writer is not None:
                    writer.submit(append, t, i).result()
                else:
                    append(t, i)
                mine.append(time.perf_counter() - started)
            with lock:
                waits.extend(mine)

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for thread in pool:
            thread.start()
        go.wait()
        began = time.perf_counter()
        for thread in pool:
            thread.join()
        elapsed = time.perf_counter() - began
        if writer is not None:
            writer.shutdown()
        db.dispose()
        return threads * writes / elapsed, waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="8,32")
    parser.add_argument("--writes", type=int, default=40, help="appends per thread per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'threads':>7}  {'path':<14}{'writes/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for threads in (int(t) for t in args.threads.split(",")):
        rates: dict[str, list[float]] = {p: [] for p in PATHS}
        waits: dict[str, list[float]] = {p: [] for p in PATHS}
        for _ in range(args.rounds):
            for path in PATHS:
                rate, waited = run(path, threads, args.writes)
                rates[path].append(rate)
                waits[path].extend(waited)
        for path in PATHS:
            ordered = sorted(waits[path])
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            print(f"{threads:>7}  {path:<14}{statistics.median(rates[path]):>9.0f}"
                  f"{statistics.median(ordered) * 1000:>9.1f}{p99 * 1000:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
