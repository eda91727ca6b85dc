"""Wake-ups for watchers of replies written by another process, on PostgreSQL: one connection
per process LISTENs on db.REPLY_CHANNEL, and every NOTIFY (sent when a reply's row is flushed,
settled or interrupted: runs/rows.py, chats.update_browser_reply) wakes that reply's followers
at once, instead of each re-reading the row four times a second. A follower still re-reads
now and then (NOTIFIED_POLL_SECONDS) in case a notification was lost with a dropped
connection; SQLite has no notifications and keeps the quick poll."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.engine import make_url

from ..db import PG_CONNECT_TIMEOUT_S, REPLY_CHANNEL

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 2.0


class ReplyListener:
    """Calls ``wake(message_id)`` for each notification, from its own thread."""

    def __init__(self, database_url: str, wake: Callable[[str], None]) -> None:
        # psycopg takes the libpq URL: the same one without SQLAlchemy's "+psycopg".
        self.url = make_url(database_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self.wake = wake
        self.listening = threading.Event()  # set while connected and listening
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="bchat-reply-listener",
                                        daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        import psycopg

        while not self._closing.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True,
                                     connect_timeout=PG_CONNECT_TIMEOUT_S,
                                     application_name="bchat-listen") as conn:
                    conn.execute(f"LISTEN {REPLY_CHANNEL}")
                    self.listening.set()
                    while not self._closing.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self.wake(note.payload)
            except Exception:
                if not self._closing.is_set():
                    log.warning("reply notifications lost their connection; retrying",
                                exc_info=True)
            finally:
                self.listening.clear()
            self._closing.wait(RECONNECT_SECONDS)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=3)
