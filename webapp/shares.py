"""Share links: read-only snapshots of a conversation that anyone with the link can open.

A link is ``/s/<token>`` with ``token = secrets.token_urlsafe(32)`` (256 random bits). The
database keeps only ``sha256(token)`` to find the share, and the token sealed with a key
derived from the app's secret key so the owner can be shown the same link again. Sharing
again refreshes the snapshot and keeps the link; ``new_link`` replaces it (the old link dies).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any

from sqlalchemy import select

from .chats import ChatService, NotFound, conversation_dict, message_dict
from .db import Database, lock_row
from .models import Conversation, Share, new_public_id, utcnow

TOKEN_BYTES = 32


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ShareService:
    def __init__(self, db: Database, chats: ChatService, secret_key: str, model_facts) -> None:
        self.db = db
        self.chats = chats
        self._secret = secret_key.encode()
        self._model_facts = model_facts  # model id -> facts dict or None, for provenance

    # -- tokens ----------------------------------------------------------------------------
    def _pad(self, share_public_id: str) -> bytes:
        return hmac.new(self._secret, b"bchat share token|" + share_public_id.encode(),
                        hashlib.sha256).digest()

    def _seal(self, share_public_id: str, raw: bytes) -> str:
        sealed = bytes(a ^ b for a, b in zip(raw, self._pad(share_public_id), strict=True))
        return base64.urlsafe_b64encode(sealed).decode()

    def _unseal(self, share: Share) -> str:
        sealed = base64.urlsafe_b64decode(share.token_sealed.encode())
        raw = bytes(a ^ b for a, b in zip(sealed, self._pad(share.public_id), strict=True))
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def _new_token(self, share: Share) -> str:
        raw = secrets.token_bytes(TOKEN_BYTES)  # what secrets.token_urlsafe(32) encodes
        token = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        share.token_hash = token_hash(token)
        share.token_sealed = self._seal(share.public_id, raw)
        return token

    # -- snapshots -------------------------------------------------------------------------
    def _snapshot(self, conv: Conversation) -> dict[str, Any]:
        messages = []
        for message in conv.messages:
            data = message_dict(message)
            facts = self._model_facts(message.model) if message.model else None
            if facts:
                data["quantization"] = facts.get("quantization")
            messages.append(data)
        return {"conversation": conversation_dict(conv), "messages": messages}

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
            conv = self.chats.owned(session, owner_id, conversation_id)
            lock_row(session, Conversation, conv.id)  # concurrent shares: one inserts, others update
            share = session.scalar(select(Share).where(Share.conversation_id == conv.id))
            token = None
            if share is None:
                share = Share(public_id=new_public_id(), owner_id=owner_id, conversation_id=conv.id)
                token = self._new_token(share)  # sealed with a key bound to public_id
                session.add(share)
            elif new_link:
                token = self._new_token(share)
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
            shares = session.scalars(
                select(Share).where(Share.owner_id == owner_id).order_by(Share.updated_at.desc())
            )
            return [self.share_info(s) for s in shares]

    def shared_conversation_ids(self, owner_id: str) -> set[str]:
        with self.db.read() as session:
            rows = session.execute(
                select(Conversation.public_id)
                .join(Share, Share.conversation_id == Conversation.id)
                .where(Share.owner_id == owner_id)
            )
            return {row[0] for row in rows}

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
        return self.chats.import_messages(owner_id, snapshot["title"], snapshot["messages"])
