"""Share tokens sealed with a fresh nonce per link; links sealed the old way keep working."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3

from alembic import command

from webapp import create_app
from webapp.db import alembic_config

SECRET = "test-secret"


def sealed_rows(app) -> list[tuple[str, str, int]]:
    path = app.config["DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT public_id, token_sealed, seal_version FROM share").fetchall()


def token_bytes(url: str) -> bytes:
    token = url.rsplit("/s/", 1)[1]
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def test_new_link_does_not_reuse_a_pad(client, app):
    conv = client.post("/api/conversations", json={"title": "t"}).get_json()
    first = client.post(f"/api/conversations/{conv['id']}/share", json={}).get_json()
    ((share_id, sealed_1, version),) = sealed_rows(app)
    assert version == 2
    second = client.post(f"/api/conversations/{conv['id']}/share", json={"new_link": True}).get_json()
    ((same_id, sealed_2, _),) = sealed_rows(app)
    assert same_id == share_id and first["url"] != second["url"]
    c1, c2 = base64.urlsafe_b64decode(sealed_1), base64.urlsafe_b64decode(sealed_2)
    assert len(c1) == len(c2) == 16 + 32 + 32
    # the old seal: c1 XOR c2 == token1 XOR token2, so one leaked token gave away the other
    tokens_xor = xor(token_bytes(first["url"]), token_bytes(second["url"]))
    assert xor(c1[16:48], c2[16:48]) != tokens_xor
    assert c1[:16] != c2[:16], "each link gets its own nonce"
    # the owner is shown the current link again
    (listed,) = client.get("/api/shares").get_json()["shares"]
    assert listed["url"] == second["url"]


def test_a_tampered_seal_shows_no_link_and_no_error(client, app):
    conv = client.post("/api/conversations", json={"title": "t"}).get_json()
    link = client.post(f"/api/conversations/{conv['id']}/share", json={}).get_json()["url"]
    ((share_id, sealed, _),) = sealed_rows(app)
    raw = bytearray(base64.urlsafe_b64decode(sealed))
    raw[20] ^= 1
    path = app.config["DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE share SET token_sealed = ?", (base64.urlsafe_b64encode(bytes(raw)).decode(),))
    response = client.get("/api/shares")
    assert response.status_code == 200
    assert response.get_json()["shares"][0]["url"] is None
    assert client.get(link.split("localhost", 1)[1]).status_code == 200, "the link itself still works"


def _v1_seal(public_id: str, raw: bytes) -> str:
    """How revision 0002's code sealed a token (kept here to build an old database)."""
    pad = hmac.new(SECRET.encode(), b"bchat share token|" + public_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(xor(raw, pad)).decode()


def test_version_1_links_keep_working_and_are_resealed(tmp_path, tiny_model):
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "0002")
    raw = secrets.token_bytes(32)
    token = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    with sqlite3.connect(tmp_path / "old.sqlite3") as conn:
        conn.execute(
            "INSERT INTO conversation (id, public_id, owner_id, title, created_at, updated_at)"
            " VALUES (1, 'conv-public-id-01', 'owner-1', 'old', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
        )
        conn.execute(
            "INSERT INTO share (public_id, owner_id, conversation_id, token_hash, token_sealed, title,"
            " snapshot, created_at, updated_at) VALUES (?, 'owner-1', 1, ?, ?, 'old', ?,"
            " '2026-01-01 00:00:00', '2026-01-01 00:00:00')",
            ("share-public-01", hashlib.sha256(token.encode()).hexdigest(),
             _v1_seal("share-public-01", raw),
             '{"conversation": {"id": "conv-public-id-01", "title": "old"}, "messages": []}'),
        )
    command.upgrade(cfg, "head")
    app = create_app({"TESTING": True, "DATABASE_URL": url, "MODEL_PATH": str(tiny_model),
                      "SECRET_KEY": SECRET, "N_THREADS": 1})
    try:
        assert sealed_rows(app)[0][2] == 1
        client = app.test_client()
        assert client.get(f"/s/{token}").status_code == 200
        with client.session_transaction() as session:
            session["owner"] = "owner-1"
        (listed,) = client.get("/api/shares").get_json()["shares"]
        assert listed["url"].endswith(f"/s/{token}"), "the owner sees the same link as before"
        ((_, sealed, version),) = sealed_rows(app)
        assert version == 2 and len(base64.urlsafe_b64decode(sealed)) == 80, "re-sealed on use"
        assert client.get("/api/shares").get_json()["shares"][0]["url"] == listed["url"]
        assert client.get(f"/s/{token}").status_code == 200
    finally:
        app.extensions["bchat"].close()


def test_downgrade_refuses_to_strand_version_2_links(client, app):
    import pytest

    conv = client.post("/api/conversations", json={"title": "t"}).get_json()
    client.post(f"/api/conversations/{conv['id']}/share", json={})
    cfg = alembic_config(app.config["DATABASE_URL"])
    app.extensions["bchat"].db.dispose()
    with pytest.raises(RuntimeError, match="sealed with version 2"):
        command.downgrade(cfg, "0002")
    assert sealed_rows(app)[0][2] == 2, "nothing changed"
