"""API keys: how a program (not a browser) says whose conversations a ``/v1`` call belongs to.

A key is ``bchat_`` + 43 url-safe characters (256 random bits). It is shown once, when made;
only its sha256 is stored, so a copy of the database holds no working key. A key acts as its
owner (the same anonymous owner id a browser's cookie holds), so conversations stored by
calls made with it appear in that owner's chat list, tagged ``source: "api"``.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from sqlalchemy import select, update

from .db import Database
from .errors import Invalid, NotFound
from .models import ApiKey, utcnow

TOKEN_PREFIX = "bchat_"
NAME_MAX = 100
MAX_KEYS_PER_OWNER = 500  # a bound on rows per owner, far above any real use
LAST_USED_RESOLUTION_SECONDS = 60  # last_used_at is written at most once a minute per key


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class KeyService:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, owner_id: str, name: Any) -> tuple[dict[str, Any], str]:
        """A new key for ``owner_id``: (its dict, the token, which is never shown again)."""
        if not isinstance(name, str) or not name.strip():
            raise Invalid("bad_name", "name must be a non-empty string")
        name = " ".join(name.split())
        if len(name) > NAME_MAX:
            raise Invalid("bad_name", f"name must be at most {NAME_MAX} characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.write() as session:
            live = session.scalars(
                select(ApiKey.id).where(ApiKey.owner_id == owner_id, ApiKey.revoked_at.is_(None))
            ).all()
            if len(live) >= MAX_KEYS_PER_OWNER:
                raise Invalid("too_many_keys", f"at most {MAX_KEYS_PER_OWNER} keys at once; "
                              "revoke one first")
            key = ApiKey(owner_id=owner_id, name=name, token_hash=hash_token(token),
                         prefix=token[: len(TOKEN_PREFIX) + 4])
            session.add(key)
            session.flush()
            return key.to_dict(), token

    def list_for(self, owner_id: str | None) -> list[dict[str, Any]]:
        """One owner's keys, newest first (every owner's for None: the admin's shell)."""
        with self.db.read() as session:
            query = select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
            if owner_id is not None:
                query = query.where(ApiKey.owner_id == owner_id)
            return [k.to_dict() for k in session.scalars(query)]

    def revoke(self, owner_id: str | None, key_id: str) -> dict[str, Any]:
        """Revoke a key (idempotent); NotFound for someone else's (None: any owner's)."""
        with self.db.write() as session:
            query = select(ApiKey).where(ApiKey.public_id == key_id)
            if owner_id is not None:
                query = query.where(ApiKey.owner_id == owner_id)
            key = session.scalar(query)
            if key is None:
                raise NotFound("API key")
            if key.revoked_at is None:
                key.revoked_at = utcnow()
            session.flush()
            return key.to_dict()

    def authenticate(self, token: str | None) -> dict[str, Any] | None:
        """The live key a token belongs to, or None (unknown, revoked, or not a bchat key).
        Looked up by hash: the comparison happens on digests inside the database index."""
        if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = hash_token(token)
        with self.db.read() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.token_hash == digest))
            if key is None or key.revoked_at is not None:
                return None
            found = key.to_dict()
            stale = key.last_used_at is None or (
                (utcnow() - key.last_used_at).total_seconds() > LAST_USED_RESOLUTION_SECONDS)
        if stale:
            with self.db.write() as session:
                session.execute(update(ApiKey).where(ApiKey.token_hash == digest)
                                .values(last_used_at=utcnow()))
        return found
