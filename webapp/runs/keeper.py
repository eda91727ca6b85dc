"""The keeper: a run's row (``streaming`` from the start) gets its text as it grows, every
``FLUSH_SECONDS``, so a crash loses at most that much. Several processes (``gunicorn -w N``)
share one database: each streaming row names its writer (``run_owner``) and is vouched for every
``LEASE_RENEW_SECONDS``; a row whose writer is dead (its pid gone, or its lease run out) is
marked ``interrupted`` with what it holds."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime

from ..models import utcnow
from .rows import RunRows
from .run import Run

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25  # text reaches the database at least this often while it grows
LEASE_RENEW_SECONDS = 2.0  # a live run's row is vouched for at least this often
SERVER_LEASE_SECONDS = 10.0  # a streaming row nobody vouched for this long has a dead writer
BROWSER_LEASE_SECONDS = 120.0  # pages in background tabs may only wake once a minute

HOST = socket.gethostname()
LIVE_IDENTITIES: set[str] = set()  # keepers alive in this process, by their writer identity


class Keeper:
    """Writes the live runs of one run service (``live_runs``) to their rows, as ``identity``."""

    def __init__(self, rows: RunRows, live_runs: Callable[[], list[Run]], identity: str,
                 grace: float) -> None:
        self.rows = rows
        self.live_runs = live_runs
        self.identity = identity
        self.grace = grace
        self._wake = threading.Event()
        self._closing = threading.Event()
        LIVE_IDENTITIES.add(identity)
        threading.Thread(target=self._keep, name="bchat-run-keeper", daemon=True).start()

    def wake(self) -> None:
        """A run started: the keeper sleeps while there is none."""
        self._wake.set()

    def _keep(self) -> None:
        while not self._closing.is_set():
            runs = self.live_runs()
            if not runs:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self.flush(runs)
            except Exception:
                log.exception("flushing replies failed; retrying")
            self._closing.wait(FLUSH_SECONDS)

    def flush(self, runs: list[Run]) -> None:
        """Write the text that grew, renew the leases of the rest, stop the runs nobody
        watches any more and those another process asked to stop."""
        now = time.monotonic()
        contents: dict[str, str] = {}
        lengths: dict[str, int] = {}
        vouch: list[str] = []
        for run in runs:
            if run.orphaned_at is not None and now - run.orphaned_at >= self.grace:
                run.stop("disconnect")
            with run.lock:
                if run.final_frame is not None or not run.stored:
                    continue
                if run.length != run.flushed:
                    contents[run.message_id] = "".join(run.parts)
                    lengths[run.message_id] = run.length
                elif now - run.vouched_at >= LEASE_RENEW_SECONDS:
                    vouch.append(run.message_id)
        if not contents and not vouch:
            return
        stops = self.rows.flush(contents, vouch)
        by_id = {run.message_id: run for run in runs}
        for message_id, length in lengths.items():
            by_id[message_id].flushed = length
        for message_id in list(contents) + vouch:
            by_id[message_id].vouched_at = now
        for message_id in stops:
            by_id[message_id].stop("user")

    def reap_stale(self, message_ids: list[str] | None = None) -> int:
        """Mark "interrupted" the streaming rows whose writer is dead; how many were."""
        now = utcnow()
        live = {run.message_id for run in self.live_runs()}
        dead = [message_id for message_id, run_owner, engine, renewed in self.rows.streaming()
                if (message_ids is None or message_id in message_ids) and message_id not in live
                and writer_dead(run_owner, engine, renewed, now)]
        count = self.rows.interrupt(dead, "server_restart")
        if count:
            log.warning("marked %d replies whose writer died as interrupted", count)
        return count

    def close(self, left: list[Run]) -> None:
        """The process stops: keep what the runs in ``left`` (not ended in time) wrote, marked
        "interrupted", and vouch for no row any more."""
        if left:
            try:
                self.rows.flush({run.message_id: run.text for run in left}, [])
                self.rows.interrupt([run.message_id for run in left], "shutdown")
            except Exception:
                log.exception("could not keep %d partial replies at shutdown", len(left))
        self._closing.set()
        self._wake.set()
        LIVE_IDENTITIES.discard(self.identity)


def writer_dead(run_owner: str | None, engine: str | None, renewed: datetime | None,
                now: datetime) -> bool:
    age = (now - renewed).total_seconds() if renewed is not None else float("inf")
    if engine == "browser" or run_owner == "browser":
        return age > BROWSER_LEASE_SECONDS
    if not run_owner or run_owner.count("|") != 2:
        return True
    host, pid_text, _nonce = run_owner.split("|")
    if host == HOST and pid_text.isdigit():
        pid = int(pid_text)
        if pid == os.getpid():
            return run_owner not in LIVE_IDENTITIES
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
    return age > SERVER_LEASE_SECONDS
