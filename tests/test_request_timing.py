"""Every answer says how long the app took and how much of that was SQL (Server-Timing), so a
slow answer on a busy box can be told apart from a wait for a core (bench/class_load.py)."""

from __future__ import annotations

import re

import pytest

TIMING = re.compile(r"^app;dur=(\d+\.\d), db;dur=(\d+\.\d)$")


def durations(response) -> tuple[float, float]:
    match = TIMING.match(response.headers.get("Server-Timing", ""))
    assert match, response.headers.get("Server-Timing")
    return float(match.group(1)), float(match.group(2))


@pytest.mark.databases("sqlite", "postgresql")
def test_an_answer_carries_its_app_and_database_time(client):
    client.get("/")
    created = client.post("/api/conversations", json={"title": "timed"})
    assert created.status_code == 201
    app_ms, db_ms = durations(created)
    assert 0 < db_ms <= app_ms  # it wrote a row, inside the request's own time

    listed = client.get("/api/conversations?limit=50")
    app_ms, db_ms = durations(listed)
    assert 0 < db_ms <= app_ms


def test_an_answer_without_sql_says_so_and_a_refusal_is_timed_too(client):
    script = client.get("/static/js/app.js")
    assert script.status_code == 200
    app_ms, db_ms = durations(script)
    assert db_ms == 0.0 and app_ms >= 0.0

    refused = client.post("/api/conversations", data="{", content_type="application/json")
    assert refused.status_code == 400
    durations(refused)
