"""On PostgreSQL a watcher of a reply written elsewhere (another gunicorn worker, or a page)
is woken by NOTIFY when the row changes, not by re-reading it on a timer (runs/listen.py)."""

from __future__ import annotations

import threading

import pytest

from webapp.models import Provenance
from webapp.runs import service

pytestmark = pytest.mark.databases("postgresql")


class Watcher:
    active = True

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.changed = threading.Condition()

    def deliver(self, frame: dict) -> None:
        with self.changed:
            self.frames.append(frame)
            self.changed.notify_all()

    def text(self) -> str:
        return "".join(f["text"] for f in self.frames if f["type"] == "token")

    def wait_for(self, predicate, timeout: float = 30) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)


def test_a_follower_is_woken_by_notify_not_by_its_poll(app, monkeypatch):
    # The fallback re-read is pushed far beyond the test's waits: only a NOTIFY can wake it.
    monkeypatch.setattr(service, "NOTIFIED_POLL_SECONDS", 600)
    chats, runs = app.extensions["bchat"].chats, app.extensions["bchat"].runs
    assert runs.listener is not None and runs.listener.listening.wait(30)
    conv, _ = chats.add_user_message("someone", None, "a question")
    reply = chats.add_reply("someone", conv["id"], "so far", "streaming",
                            Provenance(engine="browser"))
    watcher = Watcher()
    runs.watch("someone", reply["id"], 0, watcher)
    assert watcher.wait_for(lambda w: w.text() == "so far")
    chats.update_browser_reply("someone", conv["id"], reply["id"], "so far, and more",
                               "streaming", None)
    assert watcher.wait_for(lambda w: w.text() == "so far, and more"), watcher.frames
    chats.update_browser_reply("someone", conv["id"], reply["id"], "so far, and more. The end",
                               "complete", None)
    assert watcher.wait_for(lambda w: w.frames[-1]["type"] == "done"), watcher.frames
    assert watcher.frames[-1]["message"]["content"] == "so far, and more. The end"
    assert watcher.wait_for(lambda w: runs.followers() == 0)
