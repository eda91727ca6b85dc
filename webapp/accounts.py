"""Accounts (BCHAT_ACCOUNTS): users, the browsers signed in to them, one-time device links,
claiming an anonymous visitor's data, usage, quotas and the audit log.

The rest of bchat knows one notion of "whose": an owner id (security.owner_id). An anonymous
browser's id lives in its cookie; an account has one of its own (``Account.owner_id``), and a
browser signed in to the account acts as it. So signing in changes which owner id a browser
acts as, and nothing else in the app needs to know about accounts.

- Passwords: argon2id (argon2-cffi's defaults, RFC 9106's second recommended profile). An
  unknown username is verified against a dummy hash, so it costs the same time as a wrong
  password. Passwords are never logged or stored anywhere else.
- Sessions: the cookie holds a random token, the table its sha256; each request looks it up,
  so revoking a session (or disabling its account) signs that browser out at its next request.
- Claiming: when an anonymous visitor signs up or in, its conversations, files, defaults, API
  keys, shares and benchmark runs move to the account, in one transaction, once (the anonymous
  id is dropped from the cookie with it).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, event, func, insert, select, update

from .db import Database
from .errors import AppError, Invalid, NotFound
from .models import (
    ACCOUNT_ROLES,
    Account,
    AccountSession,
    ApiKey,
    Attachment,
    AuditEvent,
    Benchmark,
    Conversation,
    DeviceLink,
    Message,
    Share,
    SiteSetting,
    UsageCarry,
    VisitorSettings,
    iso,
    utcnow,
)

USERNAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,31}")
PASSWORD_MIN = 8
PASSWORD_MAX = 1024  # argon2 takes any length; a bound keeps one request's hashing cheap
SESSION_TOUCH_SECONDS = 60  # last_seen_at is written at most once a minute per session
USER_AGENT_MAX = 200
DEFAULT_QUOTA = "default_quota"
ROLE_MODELS = "role_models"  # {"user": [model ids]}: absent or None = every model
AUDIT_PAGE = 200


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def normalise_username(raw: Any) -> str:
    """Usernames are compared lower-cased: "Ana" and "ana" are one account."""
    if not isinstance(raw, str):
        raise Invalid("bad_username", "a username is needed")
    name = raw.strip().lower()
    if not USERNAME.fullmatch(name):
        raise Invalid("bad_username", "a username is 2 to 32 letters, digits, dots, dashes or "
                      "underscores, starting with a letter or digit")
    return name


def check_password_rules(password: Any) -> str:
    if not isinstance(password, str) or len(password) < PASSWORD_MIN:
        raise Invalid("weak_password", f"a password needs at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise Invalid("weak_password", f"a password may have at most {PASSWORD_MAX} characters")
    return password


def next_midnight(now: datetime) -> datetime:
    """Quotas count per UTC day: when the current one resets."""
    return datetime(now.year, now.month, now.day) + timedelta(days=1)


def _account_dict(account: Account) -> dict[str, Any]:
    return {"id": account.public_id, "username": account.username, "role": account.role,
            "disabled": account.disabled, "owner_id": account.owner_id,
            "created_at": iso(account.created_at), "last_sign_in_at": iso(account.last_sign_in_at),
            "tokens_per_day": account.tokens_per_day,
            "replies_in_flight": account.replies_in_flight,
            "has_password": account.password_hash is not None}


# (pattern in the User-Agent, name) in the order they must be tried: Edge and Opera say
# "Chrome" too, Chrome says "Safari", Android says "Linux".
_BROWSERS = (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"), ("Chrome/", "Chrome"),
             ("Safari/", "Safari"))
_SYSTEMS = (("iPhone", "iPhone"), ("iPad", "iPad"), ("Android", "Android"), ("Windows", "Windows"),
            ("Mac OS X", "macOS"), ("CrOS", "ChromeOS"), ("Linux", "Linux"))


def describe_agent(user_agent: str | None) -> str:
    """"Chrome on Android" from a User-Agent: enough to tell one's own browsers apart."""
    agent = user_agent or ""
    browser = next((name for key, name in _BROWSERS if key in agent), None)
    system = next((name for key, name in _SYSTEMS if key in agent), None)
    if browser and system:
        return f"{browser} on {system}"
    return browser or system or (agent[:60] if agent else "Unknown browser")


def _session_dict(row: AccountSession) -> dict[str, Any]:
    return {"id": row.public_id, "created_at": iso(row.created_at),
            "browser": describe_agent(row.user_agent),
            "last_seen_at": iso(row.last_seen_at), "user_agent": row.user_agent or "",
            "address": row.address or "", "how": row.how}


def _quota_number(value: Any, what: str) -> int | None:
    """A quota field from a form or the shell: blank or None = no own value."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise Invalid("bad_quota", f"{what} must be a whole number (blank: none)") from None
    if number < 0 or number > 10**12:
        raise Invalid("bad_quota", f"{what} must be between 0 and 10^12")
    return number


class AccountService:
    """Everything about accounts that touches the database; the pages (account_pages.py,
    admin.py) and the shell (cli.py) call it."""

    def __init__(self, db: Database, mode: str = "off", limits: Any = None) -> None:
        self.db = db
        self.mode = mode
        self.limits = limits
        self.hasher = PasswordHasher()  # argon2id
        # Verified against when the username is unknown: the same work as a wrong password.
        self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    # -- accounts ------------------------------------------------------------------------------
    def create(self, username: Any, password: Any, *, role: str = "user") -> dict[str, Any]:
        name = normalise_username(username)
        if role not in ACCOUNT_ROLES:
            raise Invalid("bad_role", f"role must be one of {', '.join(ACCOUNT_ROLES)}")
        hashed = self.hasher.hash(check_password_rules(password)) if password is not None else None
        with self.db.write() as session:
            if session.scalar(select(Account.id).where(Account.username == name)) is not None:
                raise AppError("username_taken", "that username is taken", status=409)
            account = Account(username=name, password_hash=hashed, role=role,
                              owner_id=secrets.token_urlsafe(18))
            session.add(account)
            session.flush()
            return _account_dict(account)

    def verify(self, username: Any, password: Any) -> dict[str, Any] | None:
        """The account a username and password sign in to, or None. The same work is done for
        an unknown username, a disabled account and a wrong password."""
        try:
            name = normalise_username(username)
        except Invalid:
            name = None
        given = password if isinstance(password, str) and len(password) <= PASSWORD_MAX else ""
        account = None
        if name is not None:
            with self.db.read() as session:
                row = session.scalar(select(Account).where(Account.username == name))
                account = _account_dict(row) if row is not None else None
                stored = row.password_hash if row is not None else None
        else:
            stored = None
        try:
            self.hasher.verify(stored or self._dummy_hash, given)
            ok = stored is not None
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok or account is None or account["disabled"]:
            return None
        if self.hasher.check_needs_rehash(stored):  # argon2's parameters were raised since
            with self.db.write() as session:  # the same password, so no browser is signed out
                session.execute(update(Account).where(Account.username == name)
                                .values(password_hash=self.hasher.hash(given)))
        return account

    def set_password(self, username: Any, password: Any) -> dict[str, Any]:
        """A new password; every browser signed in to the account is signed out, and its
        unused device links die too (one made by whoever took the account over would let
        them back in)."""
        name = normalise_username(username)
        hashed = self.hasher.hash(check_password_rules(password))
        with self.db.write() as session:
            account = session.scalar(select(Account).where(Account.username == name))
            if account is None:
                raise NotFound("account")
            account.password_hash = hashed
            session.execute(update(AccountSession)
                            .where(AccountSession.account_id == account.id,
                                   AccountSession.revoked_at.is_(None))
                            .values(revoked_at=utcnow()))
            session.execute(delete(DeviceLink).where(DeviceLink.account_id == account.id))
            return _account_dict(account)

    def oidc_account(self, subject: str, wanted_name: Any, *,
                     create: bool = True) -> dict[str, Any] | None:
        """The account an OpenID Connect identity ("issuer|sub") signs in to, made on its first
        sign-in with a username from ``wanted_name`` (a free variant when taken). The provider
        is the gate: a school's sign-in makes its students' accounts as they arrive. With
        ``create`` False (BCHAT_SIGNUP=admin) an unknown identity gets None: an admin links it
        to an account first (``link_oidc``)."""
        with self.db.write() as session:
            account = session.scalar(select(Account).where(Account.oidc_subject == subject))
            if account is not None:
                return _account_dict(account)
            if not create:
                return None
            base = re.sub(r"[^a-z0-9._-]", "", str(wanted_name or "").lower().split("@")[0])[:28]
            if not USERNAME.fullmatch(base):
                base = "user"
            name, n = base, 1
            while session.scalar(select(Account.id).where(Account.username == name)) is not None:
                n += 1
                name = f"{base}{n}"
            account = Account(username=name, password_hash=None, role="user",
                              owner_id=secrets.token_urlsafe(18), oidc_subject=subject)
            session.add(account)
            session.flush()
            return _account_dict(account)

    def link_oidc(self, username: Any, subject: str) -> dict[str, Any]:
        """Let an OpenID Connect identity ("issuer|sub", as the refused sign-in showed it)
        sign in to an existing account: how an admin lets someone in with BCHAT_SIGNUP=admin."""
        name = normalise_username(username)
        subject = str(subject or "").strip()
        if "|" not in subject or len(subject) > 400:
            raise Invalid("bad_subject", "the identity is the issuer, a '|' and the subject")
        with self.db.write() as session:
            account = session.scalar(select(Account).where(Account.username == name))
            if account is None:
                raise NotFound("account")
            taken = session.scalar(select(Account.username).where(Account.oidc_subject == subject))
            if taken is not None and taken != name:
                raise AppError("subject_taken", f"that identity signs in to {taken} already",
                               status=409)
            account.oidc_subject = subject
            return _account_dict(account)

    def get(self, public_id: str) -> dict[str, Any]:
        with self.db.read() as session:
            account = session.scalar(select(Account).where(Account.public_id == public_id))
            if account is None:
                raise NotFound("account")
            return _account_dict(account)

    def by_username(self, username: Any) -> dict[str, Any]:
        name = normalise_username(username)
        with self.db.read() as session:
            account = session.scalar(select(Account).where(Account.username == name))
            if account is None:
                raise NotFound("account")
            return _account_dict(account)

    def by_owner(self, owner_id: str) -> dict[str, Any] | None:
        with self.db.read() as session:
            account = session.scalar(select(Account).where(Account.owner_id == owner_id))
            return _account_dict(account) if account is not None else None

    def list(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            return [_account_dict(a) for a in session.scalars(select(Account).order_by(Account.username))]

    def count_admins(self) -> int:
        with self.db.read() as session:
            return session.scalar(select(func.count()).select_from(Account).where(
                Account.role == "admin", Account.disabled.is_(False))) or 0

    def set_disabled(self, public_id: str, disabled: bool) -> dict[str, Any]:
        with self.db.write() as session:
            account = session.scalar(select(Account).where(Account.public_id == public_id))
            if account is None:
                raise NotFound("account")
            account.disabled = disabled
            if disabled:  # its browsers are signed out now, not at their next sign-in
                session.execute(update(AccountSession)
                                .where(AccountSession.account_id == account.id,
                                       AccountSession.revoked_at.is_(None))
                                .values(revoked_at=utcnow()))
            return _account_dict(account)

    def set_role(self, public_id: str, role: str) -> dict[str, Any]:
        if role not in ACCOUNT_ROLES:
            raise Invalid("bad_role", f"role must be one of {', '.join(ACCOUNT_ROLES)}")
        with self.db.write() as session:
            account = session.scalar(select(Account).where(Account.public_id == public_id))
            if account is None:
                raise NotFound("account")
            account.role = role
            return _account_dict(account)

    def delete(self, public_id: str) -> dict[str, Any]:
        """The account and everything it owns: conversations (their messages with them),
        files, shares, defaults, API keys, benchmark runs, sessions and device links. One
        transaction: a failure leaves all of it."""
        with self.db.write() as session:
            account = session.scalar(select(Account).where(Account.public_id == public_id))
            if account is None:
                raise NotFound("account")
            gone = _account_dict(account)
            owner = account.owner_id
            # Attachments: a sent one would go with its conversation, an upload not yet sent
            # would not; their passages go with them (ON DELETE CASCADE).
            for model in (Share, ApiKey, Benchmark, VisitorSettings, UsageCarry, Attachment):
                session.execute(delete(model).where(model.owner_id == owner))
            # Messages go with their conversation (ON DELETE CASCADE on both databases).
            session.execute(delete(Conversation).where(Conversation.owner_id == owner))
            session.execute(delete(AccountSession).where(AccountSession.account_id == account.id))
            session.execute(delete(DeviceLink).where(DeviceLink.account_id == account.id))
            session.delete(account)
            return gone

    def key_allowed(self, owner_id: str) -> bool:
        """Whether an API key of ``owner_id`` may act: never for a disabled account, and with
        accounts required only for a live account's keys (a key dies with its account)."""
        if not self.enabled:
            return True
        account = self.by_owner(owner_id)
        if account is None:
            return self.mode != "required"
        return not account["disabled"]

    # -- quotas --------------------------------------------------------------------------------
    def default_quota(self) -> dict[str, int | None]:
        with self.db.read() as session:
            row = session.get(SiteSetting, DEFAULT_QUOTA)
            value = row.value if row is not None else {}
        return {"tokens_per_day": value.get("tokens_per_day"),
                "replies_in_flight": value.get("replies_in_flight")}

    def set_default_quota(self, tokens_per_day: Any, replies_in_flight: Any) -> dict[str, Any]:
        value = {"tokens_per_day": _quota_number(tokens_per_day, "tokens per day"),
                 "replies_in_flight": _quota_number(replies_in_flight, "replies in flight")}
        with self.db.write() as session:
            row = session.get(SiteSetting, DEFAULT_QUOTA)
            if row is None:
                session.add(SiteSetting(name=DEFAULT_QUOTA, value=value))
            else:
                row.value, row.updated_at = value, utcnow()
        return value

    def set_quota(self, public_id: str, tokens_per_day: Any, replies_in_flight: Any) -> dict[str, Any]:
        tokens = _quota_number(tokens_per_day, "tokens per day")
        replies = _quota_number(replies_in_flight, "replies in flight")
        with self.db.write() as session:
            account = session.scalar(select(Account).where(Account.public_id == public_id))
            if account is None:
                raise NotFound("account")
            account.tokens_per_day, account.replies_in_flight = tokens, replies
            return _account_dict(account)

    def tokens_today(self, owner_id: str, now: datetime | None = None) -> int:
        """Prompt + completion tokens of the server's replies to ``owner_id`` since UTC
        midnight, deleted conversations' too (browser-engine replies cost the server nothing
        and do not count)."""
        now = now or utcnow()
        start = datetime(now.year, now.month, now.day)
        with self.db.read() as session:
            total = session.scalar(
                select(func.coalesce(func.sum(func.coalesce(Message.prompt_tokens, 0)
                                              + func.coalesce(Message.completion_tokens, 0)), 0))
                .join(Conversation, Message.conversation_id == Conversation.id)
                .where(Conversation.owner_id == owner_id, Message.role == "assistant",
                       Message.engine == "server", Message.created_at >= start))
            carried = session.scalar(
                select(func.coalesce(func.sum(UsageCarry.prompt_tokens + UsageCarry.completion_tokens), 0))
                .where(UsageCarry.owner_id == owner_id, UsageCarry.engine == "server",
                       UsageCarry.day == start.date().isoformat()))
        return int(total or 0) + int(carried or 0)

    # -- models per role ---------------------------------------------------------------------
    def allowed_models(self, role: str) -> list[str] | None:
        """The models a role may use (None: all). Admins may always use every model."""
        if role == "admin":
            return None
        with self.db.read() as session:
            row = session.get(SiteSetting, ROLE_MODELS)
            return (row.value or {}).get(role) if row is not None else None

    def set_allowed_models(self, role: str, models: list[str] | None) -> None:
        if role not in ACCOUNT_ROLES or role == "admin":
            raise Invalid("bad_role", "only the user role's models can be limited")
        if models is not None and not models:
            raise Invalid("no_models", "leave at least one model for users")
        with self.db.write() as session:
            row = session.get(SiteSetting, ROLE_MODELS)
            value = {**(row.value if row is not None else {}), role: models}
            if row is None:
                session.add(SiteSetting(name=ROLE_MODELS, value=value))
            else:
                row.value, row.updated_at = value, utcnow()

    def models_for(self, owner_id: str | None) -> list[str] | None:
        """The models this owner may use (None: all): an account's role's, and the user
        role's for an anonymous visitor (the least a signed-in person gets)."""
        if not self.enabled:
            return None
        account = self.by_owner(owner_id) if owner_id else None
        return self.allowed_models(account["role"] if account else "user")

    def admit(self, owner_id: str, needed: int = 1, models: Any = ()) -> int | None:
        """Called before a reply starts (runs.service): a model the owner's role may not use
        is ``model_not_allowed``; an account over its token quota gets ``quota_exceeded`` with
        when it resets. Answers the account's cap on replies in flight (None: none), which
        runs.service hands to limits.take_replies: checked and taken there under one lock.
        Anonymous visitors keep the rate limits, and the user role's models."""
        account = self.by_owner(owner_id)
        allowed = self.allowed_models(account["role"] if account else "user")
        refused = [m for m in models if allowed is not None and m not in allowed]
        if refused:
            raise AppError("model_not_allowed", f"the model {refused[0]} is not offered to your "
                           "account; choose another", status=403, param="model")
        if account is None:
            return
        if account["disabled"]:
            raise AppError("account_disabled", "this account is disabled", status=403)
        default = self.default_quota()
        replies = account["replies_in_flight"]
        replies = default["replies_in_flight"] if replies is None else replies
        tokens = account["tokens_per_day"]
        tokens = default["tokens_per_day"] if tokens is None else tokens
        if tokens is not None:
            now = utcnow()
            used = self.tokens_today(owner_id, now)
            if used >= tokens:
                resets = next_midnight(now)
                wait = max(1, int((resets - now).total_seconds()))
                hours, minutes = divmod(wait // 60, 60)
                raise AppError("quota_exceeded", f"you have used your {tokens} tokens for today; "
                               f"the quota resets at 00:00 UTC (in {hours} h {minutes} min)",
                               retry_after=wait, resets_at=iso(resets), quota="tokens_per_day",
                               limit=tokens, used=used)
        return replies

    # -- usage ---------------------------------------------------------------------------------
    def usage(self, days: int = 30, owner_id: str | None = None) -> list[dict[str, Any]]:
        """Replies and tokens per owner, day (UTC), engine and model, newest day first: what
        the stored replies record, and what deleted conversations had (UsageCarry)."""
        since = utcnow() - timedelta(days=days)
        day = func.date(Message.created_at)
        query = (select(Conversation.owner_id, day, Message.engine, Message.model,
                        func.count(), func.coalesce(func.sum(Message.prompt_tokens), 0),
                        func.coalesce(func.sum(Message.completion_tokens), 0))
                 .join(Conversation, Message.conversation_id == Conversation.id)
                 .where(Message.role == "assistant", Message.status != "streaming",
                        Message.created_at >= since)
                 .group_by(Conversation.owner_id, day, Message.engine, Message.model))
        carried = (select(UsageCarry.owner_id, UsageCarry.day, UsageCarry.engine, UsageCarry.model,
                          func.sum(UsageCarry.replies), func.sum(UsageCarry.prompt_tokens),
                          func.sum(UsageCarry.completion_tokens))
                   .where(UsageCarry.day >= since.date().isoformat())
                   .group_by(UsageCarry.owner_id, UsageCarry.day, UsageCarry.engine, UsageCarry.model))
        if owner_id is not None:
            query = query.where(Conversation.owner_id == owner_id)
            carried = carried.where(UsageCarry.owner_id == owner_id)
        totals: dict[tuple[str, str, str, str], list[int]] = {}
        with self.db.read() as session:
            for rows in (session.execute(query), session.execute(carried)):
                for owner, d, engine, model, n, p, c in rows:
                    key = (owner, str(d)[:10], engine or "server", model or "")
                    total = totals.setdefault(key, [0, 0, 0])
                    total[0] += int(n or 0)
                    total[1] += int(p or 0)
                    total[2] += int(c or 0)
        return [{"owner_id": owner, "day": d, "engine": engine, "model": model, "replies": n,
                 "prompt_tokens": p, "completion_tokens": c}
                for (owner, d, engine, model), (n, p, c)
                in sorted(totals.items(), key=lambda item: (item[0][1], item[0][0]), reverse=True)]

    # -- sessions ------------------------------------------------------------------------------
    def open_session(self, account_id: str, *, user_agent: str | None, address: str | None,
                     how: str = "password") -> str:
        """A new signed-in browser: its cookie token (stored only as a hash)."""
        token = secrets.token_urlsafe(32)
        with self.db.write() as session:
            account = session.scalar(select(Account).where(Account.public_id == account_id))
            if account is None or account.disabled:
                raise NotFound("account")
            now = utcnow()
            account.last_sign_in_at = now
            session.add(AccountSession(token_hash=hash_token(token), account_id=account.id,
                                       created_at=now, last_seen_at=now, how=how,
                                       user_agent=(user_agent or "")[:USER_AGENT_MAX] or None,
                                       address=(address or "")[:64] or None))
        return token

    def session_account(self, token: str) -> dict[str, Any] | None:
        """The account a cookie's session token signs in to: None when it is unknown, revoked,
        or its account is disabled."""
        if not isinstance(token, str) or len(token) > 100:
            return None
        digest = hash_token(token)
        with self.db.read() as session:
            row = session.execute(select(AccountSession, Account)
                                  .join(Account, AccountSession.account_id == Account.id)
                                  .where(AccountSession.token_hash == digest)).first()
            if row is None:
                return None
            record, account = row
            if record.revoked_at is not None or account.disabled:
                return None
            found = {**_account_dict(account), "session_id": record.public_id}
            stale = (utcnow() - record.last_seen_at).total_seconds() > SESSION_TOUCH_SECONDS
        if stale:
            with self.db.write() as session:
                session.execute(update(AccountSession).where(AccountSession.token_hash == digest)
                                .values(last_seen_at=utcnow()))
        return found

    def sessions(self, account_id: str) -> list[dict[str, Any]]:
        with self.db.read() as session:
            rows = session.scalars(
                select(AccountSession).join(Account, AccountSession.account_id == Account.id)
                .where(Account.public_id == account_id, AccountSession.revoked_at.is_(None))
                .order_by(AccountSession.last_seen_at.desc()))
            return [_session_dict(r) for r in rows]

    def revoke_session(self, account_id: str, session_id: str) -> None:
        """Sign one browser out (NotFound for another account's session). The account's
        unused device links go with it: that browser may have made one to get back in."""
        with self.db.write() as session:
            record = session.scalar(
                select(AccountSession).join(Account, AccountSession.account_id == Account.id)
                .where(Account.public_id == account_id, AccountSession.public_id == session_id))
            if record is None:
                raise NotFound("session")
            if record.revoked_at is None:
                record.revoked_at = utcnow()
            session.execute(delete(DeviceLink).where(DeviceLink.account_id == record.account_id))

    def end_session(self, token: str) -> None:
        """Sign out: the cookie's own session."""
        with self.db.write() as session:
            session.execute(update(AccountSession)
                            .where(AccountSession.token_hash == hash_token(token),
                                   AccountSession.revoked_at.is_(None))
                            .values(revoked_at=utcnow()))

    # -- claiming ------------------------------------------------------------------------------
    def claim(self, anonymous_owner: str | None, account_id: str) -> dict[str, int]:
        """Move an anonymous visitor's data into the account, in one transaction: counts of
        what moved. The account's own defaults win over the visitor's, if it has some."""
        with self.db.write() as session:
            account = session.scalar(select(Account).where(Account.public_id == account_id))
            if account is None:
                raise NotFound("account")
            return self._move(session, anonymous_owner, account.owner_id)

    @staticmethod
    def _move(session, anonymous_owner: str | None, owner: str) -> dict[str, int]:
        moved = {"conversations": 0, "shares": 0, "api_keys": 0, "benchmarks": 0, "defaults": 0,
                 "deleted_usage": 0, "attachments": 0}
        if not anonymous_owner or anonymous_owner == owner or session.scalar(
                select(Account.id).where(Account.owner_id == anonymous_owner)) is not None:
            return moved  # an account's id is never claimed by another owner
        for name, model in (("conversations", Conversation), ("shares", Share),
                            ("api_keys", ApiKey), ("benchmarks", Benchmark),
                            ("deleted_usage", UsageCarry),
                            # Files too: uploads not yet sent would be lost, and the storage
                            # quota counts by owner.
                            ("attachments", Attachment)):
            result = session.execute(update(model).where(model.owner_id == anonymous_owner)
                                     .values(owner_id=owner))
            moved[name] = result.rowcount or 0
        visitor = session.get(VisitorSettings, anonymous_owner)
        if visitor is not None:
            if session.get(VisitorSettings, owner) is None and visitor.settings:
                session.add(VisitorSettings(owner_id=owner, settings=dict(visitor.settings)))
                moved["defaults"] = 1
            session.delete(visitor)
        return moved

    # -- device links --------------------------------------------------------------------------
    def make_device_link(self, *, account_id: str | None, owner_id: str | None,
                         seconds: int) -> tuple[str, datetime]:
        """A one-time token for another device: it signs in to the account, or (accounts off)
        carries the anonymous owner id. (token, when it expires)."""
        token = secrets.token_urlsafe(24)
        now = utcnow()
        expires = now + timedelta(seconds=seconds)
        with self.db.write() as session:
            internal = None
            if account_id is not None:
                internal = session.scalar(select(Account.id).where(Account.public_id == account_id))
                if internal is None:
                    raise NotFound("account")
            # Old links are kept only until they expire: drop the expired ones as we go.
            session.execute(delete(DeviceLink).where(DeviceLink.expires_at < now))
            session.add(DeviceLink(token_hash=hash_token(token), account_id=internal,
                                   owner_id=None if internal else owner_id, created_at=now,
                                   expires_at=expires))
        return token, expires

    def peek_device_link(self, token: str) -> bool:
        """Whether a device link would still work (the page that asks to confirm it)."""
        if not isinstance(token, str) or len(token) > 100:
            return False
        with self.db.read() as session:
            link = session.scalar(select(DeviceLink).where(DeviceLink.token_hash == hash_token(token)))
            return link is not None and link.used_at is None and link.expires_at > utcnow()

    def redeem_device_link(self, token: str) -> dict[str, Any]:
        """Use a device link, once: {"account": dict} or {"owner_id": id}. NotFound when it is
        unknown, used or expired (told apart by no one). The used mark is written in the same
        transaction that reads it, so two devices racing with one link cannot both win."""
        if not isinstance(token, str) or len(token) > 100:
            raise NotFound("link")
        now = utcnow()
        with self.db.write() as session:
            result = session.execute(update(DeviceLink)
                                     .where(DeviceLink.token_hash == hash_token(token),
                                            DeviceLink.used_at.is_(None),
                                            DeviceLink.expires_at > now)
                                     .values(used_at=now))
            if (result.rowcount or 0) != 1:
                raise NotFound("link", "this link was used already or has expired: make a new one")
            link = session.scalar(select(DeviceLink).where(DeviceLink.token_hash == hash_token(token)))
            if link.account_id is None:
                return {"owner_id": link.owner_id}
            account = session.get(Account, link.account_id)
            if account is None or account.disabled:
                raise NotFound("link", "this link was used already or has expired: make a new one")
            return {"account": _account_dict(account)}

    # -- audit log -----------------------------------------------------------------------------
    def audit(self, action: str, *, actor: str | None = None, target: str | None = None,
              address: str | None = None, detail: dict[str, Any] | None = None) -> None:
        with self.db.write() as session:
            session.add(AuditEvent(action=action, actor=actor, target=(target or "")[:64] or None,
                                   address=(address or "")[:64] or None, detail=detail or None))

    def audit_log(self, limit: int = AUDIT_PAGE) -> list[dict[str, Any]]:
        with self.db.read() as session:
            rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit))
            return [{"at": iso(r.at), "actor": r.actor or "", "action": r.action,
                     "target": r.target or "", "address": r.address or "",
                     "detail": r.detail or {}} for r in rows]


@event.listens_for(Conversation, "before_delete")
def keep_usage_of_deleted(_mapper, connection, conversation: Conversation) -> None:
    """A conversation deleted through the ORM (chats.delete: a person deleting a chat) leaves
    its replies' counts behind, in the same transaction, so that deleting a chat neither
    resets a quota nor hides usage from the admin. (Deleting an account deletes these too.)"""
    day = func.date(Message.created_at)
    rows = connection.execute(
        select(day, Message.engine, Message.model, func.count(),
               func.coalesce(func.sum(Message.prompt_tokens), 0),
               func.coalesce(func.sum(Message.completion_tokens), 0))
        .where(Message.conversation_id == conversation.id, Message.role == "assistant",
               Message.status != "streaming")
        .group_by(day, Message.engine, Message.model)).all()
    if rows:
        connection.execute(insert(UsageCarry), [
            {"owner_id": conversation.owner_id, "day": str(d)[:10], "engine": engine,
             "model": model, "replies": int(n), "prompt_tokens": int(p or 0),
             "completion_tokens": int(c or 0), "created_at": utcnow()}
            for d, engine, model, n, p, c in rows])


EXTENSION_KEY = "bchat.accounts"


def init_app(app, limits: Any, runs: Any, db: Database) -> AccountService:
    """The app's account service; with accounts on, every reply is admitted by its quota
    first (runs.service asks ``admission`` before a run starts)."""
    service = app.extensions[EXTENSION_KEY] = AccountService(db, app.config["ACCOUNTS"], limits)
    if service.enabled:
        runs.admission = service.admit
    return service


def get_accounts() -> AccountService:
    from flask import current_app

    return current_app.extensions[EXTENSION_KEY]
