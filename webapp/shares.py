"""Share links: read-only snapshots of a conversation that anyone with the link can open.

A link is ``/s/<token>`` with ``token = secrets.token_urlsafe(32)`` (256 random bits). The
database keeps only ``sha256(token)`` to find the share, and the token sealed with keys
derived from the app's secret key so the owner can be shown the same link again. Sharing
again refreshes the snapshot and keeps the link; ``new_link`` replaces it (the old link dies).

Sealing (version 2): authenticated encryption built from HMAC-SHA256 alone, because the
standard library has no AES and bchat takes no crypto dependency for this one field:

    nonce = 16 random bytes, fresh for every token
    ct    = token XOR HMAC(k_enc, nonce || counter)      (a CTR keystream)
    tag   = HMAC(k_mac, "v2|" || share public id || "|" || nonce || ct)
    sealed = base64url(nonce || ct || tag)

with ``k_enc``, ``k_mac`` two HMACs of the secret key under different labels. A fresh nonce
means two tokens of one share never share a keystream; the tag binds a sealed token to its
share and tells a wrong secret key from a right one. Version 1 (before migration 0003) was
``token XOR HMAC(key, public id)``: the same pad for every token of a share, so two links of
one share XORed together gave away the XOR of the tokens. Version-1 rows are still read, and
re-sealed as version 2 the next time the owner's list or the share is touched.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import object_session

from .attachments import texts_for
from .chats import ChatService
from .db import Database
from .errors import NotFound
from .models import Conversation, Share, new_public_id, utcnow
from .tree import current_branch

TOKEN_BYTES = 32
SEAL_VERSION = 2
NONCE_BYTES = 16
TAG_BYTES = 32


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sealer:
    """Seals share tokens so the owner can see a link again; see the module docstring."""

    def __init__(self, secret_key: str) -> None:
        secret = secret_key.encode()
        self._v1_key = secret
        self._enc_key = hmac.new(secret, b"bchat share seal v2|encrypt", hashlib.sha256).digest()
        self._mac_key = hmac.new(secret, b"bchat share seal v2|authenticate", hashlib.sha256).digest()

    def _keystream(self, nonce: bytes, length: int) -> bytes:
        blocks = (
            hmac.new(self._enc_key, nonce + counter.to_bytes(4, "big"), hashlib.sha256).digest()
            for counter in range((length + 31) // 32)
        )
        return b"".join(blocks)[:length]

    def _tag(self, share_public_id: str, nonce: bytes, ciphertext: bytes) -> bytes:
        message = b"v2|" + share_public_id.encode() + b"|" + nonce + ciphertext
        return hmac.new(self._mac_key, message, hashlib.sha256).digest()

    def seal(self, share_public_id: str, raw: bytes) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = bytes(a ^ b for a, b in zip(raw, self._keystream(nonce, len(raw)), strict=True))
        tag = self._tag(share_public_id, nonce, ciphertext)
        return base64.urlsafe_b64encode(nonce + ciphertext + tag).decode()

    def unseal(self, share_public_id: str, sealed: str, version: int) -> bytes | None:
        """The raw token, or None if ``sealed`` was not made by this key for this share."""
        try:
            data = base64.urlsafe_b64decode(sealed.encode())
        except ValueError:
            return None
        if version == 1:  # unauthenticated: a wrong key gives a wrong token, not None
            pad = hmac.new(self._v1_key, b"bchat share token|" + share_public_id.encode(),
                           hashlib.sha256).digest()
            return bytes(a ^ b for a, b in zip(data, pad, strict=True)) if len(data) == TOKEN_BYTES else None
        if len(data) != NONCE_BYTES + TOKEN_BYTES + TAG_BYTES:
            return None
        nonce, ciphertext, tag = data[:NONCE_BYTES], data[NONCE_BYTES:-TAG_BYTES], data[-TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(share_public_id, nonce, ciphertext)):
            return None
        return bytes(a ^ b for a, b in zip(ciphertext, self._keystream(nonce, len(ciphertext)), strict=True))


class ShareService:
    def __init__(self, db: Database, chats: ChatService, secret_key: str, model_facts) -> None:
        self.db = db
        self.chats = chats
        self._sealer = Sealer(secret_key)
        self._model_facts = model_facts  # model id -> facts dict or None, for provenance

    # -- tokens ----------------------------------------------------------------------------
    def _unseal(self, share: Share) -> str | None:
        """The share's token, or None when the sealed copy does not open (another secret key)."""
        raw = self._sealer.unseal(share.public_id, share.token_sealed, share.seal_version)
        return None if raw is None else base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def _reseal(self, share: Share) -> None:
        """Move a version-1 row to the current sealing; the link itself does not change."""
        raw = self._sealer.unseal(share.public_id, share.token_sealed, share.seal_version)
        if raw is not None:
            share.token_sealed = self._sealer.seal(share.public_id, raw)
            share.seal_version = SEAL_VERSION

    def _new_token(self, share: Share) -> str:
        raw = secrets.token_bytes(TOKEN_BYTES)  # what secrets.token_urlsafe(32) encodes
        token = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        share.token_hash = token_hash(token)
        share.token_sealed = self._sealer.seal(share.public_id, raw)
        share.seal_version = SEAL_VERSION
        return token

    # -- snapshots -------------------------------------------------------------------------
    def _snapshot(self, conv: Conversation) -> dict[str, Any]:
        """The branch on screen (root to current leaf) with the conversation's settings: what
        a visitor reads, and what "continue" copies."""
        messages = []
        branch = current_branch(conv)
        parents = {m.id: m.public_id for m in branch}
        # files with their text, so "continue" copies them (the page shows their chips)
        texts = texts_for(object_session(conv), [m.public_id for m in branch if m.attachments])
        for message in branch:
            data = message.to_dict(parents)
            if message.public_id in texts:
                data["attachments"] = texts[message.public_id]
            facts = self._model_facts(message.model) if message.model else None
            if facts:
                data["quantization"] = facts.get("quantization")
            messages.append(data)
        return {"conversation": conv.to_dict(), "messages": messages}

    def share_info(self, share: Share, token: str | None = None) -> dict[str, Any]:
        return {
            "id": share.public_id,
            "token": token or self._unseal(share),
            "title": share.title,
            "conversation_id": share.snapshot["conversation"]["id"],
            "conversation_exists": share.conversation_id is not None,
            "messages": len(share.snapshot["messages"]),
            "created_at": share.created_at.isoformat(timespec="seconds") + "Z",
            "updated_at": share.updated_at.isoformat(timespec="seconds") + "Z",
        }

    # -- owner actions ---------------------------------------------------------------------
    def share(self, owner_id: str, conversation_id: str, *, new_link: bool = False) -> dict:
        with self.db.write() as session:
            # locked as it is found: of concurrent shares one inserts, the others update
            conv = self.chats.owned(session, owner_id, conversation_id, lock=True)
            share = session.scalar(select(Share).where(Share.conversation_id == conv.id))
            token = None
            if share is None:
                share = Share(public_id=new_public_id(), owner_id=owner_id, conversation_id=conv.id)
                token = self._new_token(share)  # sealed with a key bound to public_id
                session.add(share)
            elif new_link:
                token = self._new_token(share)
            elif share.seal_version != SEAL_VERSION:
                self._reseal(share)
            share.title = conv.title
            share.snapshot = self._snapshot(conv)
            share.updated_at = utcnow()
            session.flush()
            return self.share_info(share, token)

    def revoke(self, owner_id: str, conversation_id: str) -> None:
        with self.db.write() as session:
            conv = self.chats.owned(session, owner_id, conversation_id)
            share = session.scalar(select(Share).where(Share.conversation_id == conv.id))
            if share is None:
                raise NotFound(conversation_id)
            session.delete(share)

    def revoke_by_id(self, owner_id: str, share_id: str) -> None:
        with self.db.write() as session:
            share = session.scalar(
                select(Share).where(Share.public_id == share_id, Share.owner_id == owner_id)
            )
            if share is None:
                raise NotFound(share_id)
            session.delete(share)

    def list_for(self, owner_id: str) -> list[dict[str, Any]]:
        with self.db.read() as session:
            shares = list(session.scalars(
                select(Share).where(Share.owner_id == owner_id).order_by(Share.updated_at.desc())
            ))
            listing = [self.share_info(s) for s in shares]
            old = [s.id for s in shares if s.seal_version != SEAL_VERSION]
        if old:  # rare (once per share after the upgrade), so the write waits for it
            with self.db.write() as session:
                for share in session.scalars(select(Share).where(Share.id.in_(old))):
                    if share.seal_version != SEAL_VERSION:
                        self._reseal(share)
        return listing

    # -- visitor actions -------------------------------------------------------------------
    def lookup(self, token: str) -> dict[str, Any]:
        """The snapshot behind a link; NotFound for unknown or revoked links."""
        if not token or len(token) > 100:
            raise NotFound("share")
        with self.db.read() as session:
            share = session.scalar(select(Share).where(Share.token_hash == token_hash(token)))
            if share is None:
                raise NotFound("share")
            return {"title": share.title, "updated_at": share.updated_at, **share.snapshot}

    def continue_as(self, token: str, owner_id: str) -> dict[str, Any]:
        """Copy the snapshot into a new conversation owned by ``owner_id``."""
        snapshot = self.lookup(token)
        settings = snapshot.get("conversation", {}).get("settings") or None
        return self.chats.import_messages(owner_id, snapshot["title"], snapshot["messages"],
                                          settings=settings)
