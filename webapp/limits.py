"""Every limit on what one visitor, or one network, may take of the server: in one place.

Two kinds of limit, both counted per process:

- **Rates** (sliding windows): chats started, and tool steps the page posts, per visitor and
  per address (``BCHAT_RATE_LIMIT``),
  benchmark runs posted (``BCHAT_BENCHMARK_RATE_LIMIT``), failed passcode tries per address.
- **Holdings** (leases): replies queued or running (``BCHAT_MAX_QUEUED_PER_VISITOR`` per visitor,
  ``BCHAT_MAX_REPLIES_PER_ADDRESS`` per address), open sockets (``BCHAT_MAX_SOCKETS`` in all,
  a share of them per visitor and per address) and replies written elsewhere that a visitor
  follows from the database (``MAX_FOLLOWS``). A holding is checked and taken in one step
  under one lock, so a burst of requests cannot all pass the check before any of them counts;
  the ``Lease`` it returns gives it back exactly once, whatever path the holder ends by.

"Visitor" is the cookie's owner id; "address" is the client address with IPv6 grouped by /64
(one subscriber usually holds a whole /64, so counting single IPv6 addresses would let one
person look like 2**64 people) and IPv4 (or IPv4-mapped IPv6) by the address itself.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from .errors import AppError, RateLimited

RATE_LIMIT_ADDRESS_FACTOR = 10  # an address's rates: this many visitors' worth (a NAT shares one)
PASSCODE_TRIES = 5  # failed passcode tries per address …
PASSCODE_WINDOW = 60.0  # … per this many seconds
COMPARE_MAX = 4  # replies one comparison runs side by side
MAX_FOLLOWS = 16  # replies written elsewhere one visitor may follow at once, all sockets together
# Sign-in tries: this many failures free, then each further one doubles the wait (from 1 s up to
# SIGNIN_MAX_WAIT); a right password clears the account's count. An address (a NAT, a school)
# gets more free tries than one account: many people share it.
SIGNIN_FREE_PER_ACCOUNT = 5
SIGNIN_FREE_PER_ADDRESS = 30
SIGNIN_MAX_WAIT = 900.0
# Failures are forgotten only after this long without one: were it the wait's cap, a guesser
# who paused 15 minutes between bursts would get the free tries back every time.
SIGNIN_FORGET_AFTER = 24 * 3600.0


def address_key(address: str | None) -> str:
    """The network a client address counts as: IPv4 by address, IPv6 by its /64."""
    if not address:
        return "-"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a zone id ("fe80::1%eth0") is local
    except ValueError:
        return address[:64]
    if ip.version == 6:
        mapped = ip.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def parse_rate(value: str) -> tuple[int, float]:
    """ "30/minute", "5/second", "100/hour" or "30/60" (per seconds) -> (count, window)."""
    count, _, per = str(value).partition("/")
    windows = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "s": 1.0, "m": 60.0, "h": 3600.0}
    window = windows.get(per.strip().lower()) if per else 60.0
    if window is None:
        window = float(per)
    return int(count), window


class SlidingWindow:
    """At most ``limit`` events per ``window`` seconds for each key (``limit`` 0: no limit)."""

    def __init__(self, limit: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._prune_at = 10_000

    def _recent(self, key: str, now: float) -> deque[float]:  # lock held
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        return events

    def wait(self, key: str) -> float:
        """Seconds until the next event for ``key`` is allowed (0: now); counts nothing."""
        if self.limit <= 0:
            return 0.0
        with self._lock:
            now = self.clock()
            events = self._recent(key, now)
            if len(events) < self.limit:
                return 0.0
            return max(0.001, events[0] + self.window - now)

    def hit(self, key: str) -> None:
        """Count an event for ``key``."""
        if self.limit <= 0:
            return
        with self._lock:
            now = self.clock()
            self._recent(key, now).append(now)
            if len(self._events) >= self._prune_at:
                # Forget keys with nothing in the window; prune again only when the table
                # has doubled, so a spray of new keys costs amortised O(1) each.
                for stale in [k for k, v in self._events.items() if not self._recent(k, now)]:
                    del self._events[stale]
                self._prune_at = max(10_000, 2 * len(self._events))

    def forget_one(self, key: str) -> None:
        """Take back the newest event for ``key`` (one that turned out not to count)."""
        with self._lock:
            events = self._events.get(key)
            if events:
                events.pop()

    def check(self, key: str) -> float:
        """``wait`` then ``hit`` in one step: 0 when allowed (and counted)."""
        if self.limit <= 0:
            return 0.0
        with self._lock:  # one lock for both halves: no other event slips between them
            now = self.clock()
            events = self._recent(key, now)
            if len(events) >= self.limit:
                return max(0.001, events[0] + self.window - now)
            events.append(now)
            return 0.0


class Backoff:
    """Failures per key: ``free`` of them cost nothing, then the wait after the last failure
    doubles with each one (1 s, 2 s, 4 s … up to ``cap``). A key quiet for ``forget``
    seconds (at least ``cap``) starts over. Unlike a fixed window, a patient guesser gets ever
    slower, not a fresh allowance every minute."""

    def __init__(self, free: int, cap: float, clock: Callable[[], float] = time.monotonic,
                 forget: float | None = None) -> None:
        self.free, self.cap, self.clock = free, cap, clock
        self.forget = max(cap, forget if forget is not None else SIGNIN_FORGET_AFTER)
        self._failures: dict[str, tuple[int, float]] = {}
        self._refused: dict[str, tuple[int, float]] = {}  # the step a refusal was reported at
        self._lock = threading.Lock()

    def _wait(self, key: str, now: float) -> float:  # lock held
        count, last = self._failures.get(key, (0, 0.0))
        if count and now - last > self.forget:
            self._failures.pop(key, None)
            return 0.0
        if count < self.free:
            return 0.0
        return max(0.0, last + min(self.cap, 2.0 ** (count - self.free)) - now)

    def check(self, keys: list[str]) -> float:
        """0 when every key may try now, and the try is counted as failed for each (until
        ``succeeded``); else the seconds to wait, counting nothing. Checked and counted under
        one lock, so a burst of guesses cannot all pass before any of them fails."""
        with self._lock:
            now = self.clock()
            wait = max(self._wait(key, now) for key in keys)
            if wait > 0:
                return wait
            for key in keys:
                count, _ = self._failures.get(key, (0, 0.0))
                self._failures[key] = (count + 1, now)
            if len(self._failures) > 100_000:  # a spray of keys: drop the quiet ones
                for stale in [k for k, (_, t) in self._failures.items() if now - t > self.forget]:
                    del self._failures[stale]
            return 0.0

    def first_refusal(self, keys: list[str]) -> bool:
        """Whether a try just refused (``check`` > 0) is the first refused at this step of
        the backoff for any of ``keys``: the audit log records that one, not each of a flood."""
        with self._lock:
            now, first = self.clock(), False
            for key in keys:
                if key in self._failures and self._wait(key, now) > 0:
                    step = self._failures[key]
                    if self._refused.get(key) != step:
                        self._refused[key], first = step, True
            if len(self._refused) > 100_000:  # a spray of keys: keep only the live ones
                self._refused = {k: v for k, v in self._refused.items() if k in self._failures}
            return first

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def forget_one(self, key: str) -> None:
        with self._lock:
            count, last = self._failures.get(key, (0, 0.0))
            if count > 1:
                self._failures[key] = (count - 1, last)
            else:
                self._failures.pop(key, None)


class Lease:
    """Units of one or more holdings, given back once by ``release`` (idempotent)."""

    def __init__(self, limits: Limits, counts: dict[str, int]) -> None:
        self._limits = limits
        self._counts = counts

    def release(self) -> None:
        counts, self._counts = self._counts, {}
        if counts:
            self._limits._give_back(counts)

    def split(self, parts: int) -> list[Lease]:
        """``parts`` leases, each holding an equal share of this one (which is then empty)."""
        counts, self._counts = self._counts, {}
        return [Lease(self._limits, {k: v // parts for k, v in counts.items()})
                for _ in range(parts)]

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.release()


def _share(total: int, fraction: float) -> int:
    """A fraction of ``total`` slots, rounded up, at least 1 (0 or less: no share limit)."""
    if fraction <= 0 or fraction >= 1:
        return 0
    return max(1, math.ceil(total * fraction))


class Limits:
    """The limits of one app instance (one process). ``config`` is the app's config."""

    def __init__(self, config: Any) -> None:
        factor = int(config.get("RATE_LIMIT_IP_FACTOR", RATE_LIMIT_ADDRESS_FACTOR))
        count, window = parse_rate(config.get("RATE_LIMIT", "30/minute"))
        self.chats_per_visitor = SlidingWindow(count, window)
        self.chats_per_address = SlidingWindow(count * factor, window)
        # The page's tool steps (tools/steps.py) run tools here as a server chat does: the same
        # rate, counted apart (one server chat runs all its steps within one start).
        self.tool_steps_per_visitor = SlidingWindow(count, window)
        self.tool_steps_per_address = SlidingWindow(count * factor, window)
        self.passcode_failures = SlidingWindow(PASSCODE_TRIES, PASSCODE_WINDOW)
        self.signin_failures = Backoff(SIGNIN_FREE_PER_ACCOUNT, SIGNIN_MAX_WAIT)
        self.signin_address_failures = Backoff(SIGNIN_FREE_PER_ADDRESS, SIGNIN_MAX_WAIT)
        count, window = parse_rate(config.get("BENCHMARK_RATE_LIMIT", "6/hour"))
        self.benchmarks_per_visitor = SlidingWindow(count, window)
        self.benchmarks_per_address = SlidingWindow(count * factor, window)
        self.replies_per_visitor = int(config.get("MAX_QUEUED_PER_VISITOR", 3))
        self.replies_per_address = int(config.get("MAX_REPLIES_PER_ADDRESS", 12))
        self.max_sockets = int(config.get("MAX_SOCKETS") or 100)
        self.sockets_per_visitor = _share(self.max_sockets,
                                          float(config.get("SOCKET_SHARE_PER_VISITOR", 0.25)))
        self.sockets_per_address = _share(self.max_sockets,
                                          float(config.get("SOCKET_SHARE_PER_ADDRESS", 0.5)))
        self.socket_retry_after = int(config.get("SOCKET_RETRY_AFTER", 5))
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def held(self, key: str) -> int:
        with self._lock:
            return self._held[key]

    def _give_back(self, counts: dict[str, int]) -> None:
        with self._lock:
            for key, n in counts.items():
                self._held[key] -= n
                if self._held[key] <= 0:
                    del self._held[key]

    def _take(self, counts: dict[str, int]) -> Lease:  # lock held
        for key, n in counts.items():
            self._held[key] += n
        return Lease(self, counts)

    # -- replies -------------------------------------------------------------------------------
    def take_replies(self, owner: str, address: str | None, needed: int = 1,
                     quota: int | None = None) -> Lease:
        """Room for ``needed`` replies of ``owner`` from ``address`` (None: not from the
        network, e.g. the command line): checked against the holdings, the chat rate and
        ``quota`` (an account's replies in flight, accounts.py), and taken, in one step.
        Raises RateLimited, or AppError ``quota_exceeded``."""
        per_visitor = self.replies_per_visitor
        if needed > 1 and per_visitor > 0:  # a comparison may run up to COMPARE_MAX at once
            per_visitor = max(per_visitor, COMPARE_MAX)
        visitor, network = f"replies|v|{owner}", None
        counts = {visitor: needed}
        if address is not None:
            network = address_key(address)
            counts[f"replies|a|{network}"] = needed
        with self._lock:
            live = self._held[visitor]
            # Checked here, not by the caller before: two sends at once both saw room.
            if quota is not None and live + needed > quota:
                raise AppError("quota_exceeded", f"your quota is {quota} replies being "
                               f"written at once; wait for one to finish", retry_after=5,
                               quota="replies_in_flight", limit=quota)
            if per_visitor > 0 and live + needed > per_visitor:
                raise RateLimited(f"you already have {live} replies being written; wait for one "
                                  "to finish or stop it", retry_after=5, code="too_many_queued")
            if network is not None and self.replies_per_address > 0 and \
                    self._held[f"replies|a|{network}"] + needed > self.replies_per_address:
                raise RateLimited("too many replies are being written for your network right "
                                  "now; try again shortly", retry_after=5, code="too_many_queued")
            wait = self.chats_per_visitor.wait(owner)
            if not wait and network is not None:
                wait = self.chats_per_address.wait(network)
            if wait:
                raise RateLimited(f"too many messages; try again in {max(1, round(wait))} s",
                                  retry_after=wait)
            self.chats_per_visitor.hit(owner)
            if network is not None:
                self.chats_per_address.hit(network)
            return self._take(counts)

    def take_follow(self, owner: str) -> Lease:
        """Room for ``owner`` to follow one more reply from the database (each is a thread
        that reads it four times a second), or RateLimited."""
        key = f"follows|v|{owner}"
        with self._lock:
            if self._held[key] >= MAX_FOLLOWS:
                raise RateLimited(f"you already follow {MAX_FOLLOWS} replies being written "
                                  "elsewhere; close a tab or wait for one to end", retry_after=1)
            return self._take({key: 1})

    def take_tool_step(self, owner: str, address: str | None) -> None:
        """A tool step posted by the page's engine (it runs tools on this server): counts
        it, or raises RateLimited (BCHAT_RATE_LIMIT, per visitor and per address)."""
        wait = self.tool_steps_per_visitor.check(owner)
        if not wait and address:
            wait = self.tool_steps_per_address.check(address_key(address))
            if wait:
                self.tool_steps_per_visitor.forget_one(owner)  # refused: it did not count
        if wait:
            raise RateLimited(f"too many tool steps; try again in {max(1, round(wait))} s",
                              retry_after=wait)

    # -- benchmarks ----------------------------------------------------------------------------
    def take_benchmark_post(self, owner: str, address: str | None) -> None:
        """Everyone sees every benchmark posted: without a limit one visitor could fill the
        page. Counts the post, or raises RateLimited."""
        wait = self.benchmarks_per_visitor.check(owner)
        if not wait and address:
            wait = self.benchmarks_per_address.check(address_key(address))
        if wait:
            when = f"{round(wait / 60)} min" if wait >= 120 else f"{max(1, round(wait))} s"
            raise RateLimited(f"too many benchmark runs posted; try again in {when}",
                              retry_after=wait)

    # -- sockets -------------------------------------------------------------------------------
    def take_socket(self, owner: str, address: str | None) -> Lease:
        """A socket slot for ``owner`` from ``address``, or AppError ``too_many_sockets``:
        503 when the process is full, 429 when this visitor or network holds its share."""
        network = address_key(address)
        visitor_key, network_key = f"sockets|v|{owner}", f"sockets|a|{network}"
        with self._lock:
            if self._held["sockets"] >= self.max_sockets:
                raise AppError("too_many_sockets", "the server has no room for another chat "
                               "connection right now; try again shortly", status=503,
                               retry_after=self.socket_retry_after)
            if self.sockets_per_visitor and self._held[visitor_key] >= self.sockets_per_visitor:
                raise AppError("too_many_sockets", f"you already have {self._held[visitor_key]} "
                               "chat connections open; close a tab first",
                               retry_after=self.socket_retry_after)
            if self.sockets_per_address and self._held[network_key] >= self.sockets_per_address:
                raise AppError("too_many_sockets", "your network already holds its share of "
                               "this server's chat connections; try again shortly",
                               retry_after=self.socket_retry_after)
            return self._take({"sockets": 1, visitor_key: 1, network_key: 1})

    # -- passcode ------------------------------------------------------------------------------
    def take_passcode_try(self, address: str | None) -> float:
        """Seconds until ``address`` (its /64 for IPv6) may try the passcode again; 0: it may
        now, and the try counts as failed until ``passcode_right`` says otherwise. Counting
        first means a burst of guesses sent at once cannot all pass before any fails."""
        return self.passcode_failures.check(address_key(address))

    def passcode_right(self, address: str | None) -> None:
        self.passcode_failures.forget_one(address_key(address))

    # -- sign-in -------------------------------------------------------------------------------
    def take_signin_try(self, username: str, address: str | None) -> float:
        """Seconds until this username, or this address (its /64), may try a password again;
        0: it may now, and the try counts as failed until ``signin_right``. Unknown usernames
        are counted like real ones, so the answer says nothing about who exists."""
        wait = self.signin_failures.check([f"u|{username}"])
        if wait:
            return wait
        wait = self.signin_address_failures.check([f"a|{address_key(address)}"])
        if wait:
            self.signin_failures.forget_one(f"u|{username}")
        return wait

    def signin_refusal_is_first(self, username: str, address: str | None) -> bool:
        """Whether a refused sign-in is the first refused at its backoff step (audit it), not
        one of the tries a guesser keeps sending during the wait (log them only)."""
        first = self.signin_failures.first_refusal([f"u|{username}"])
        return self.signin_address_failures.first_refusal([f"a|{address_key(address)}"]) or first

    def take_signup(self, address: str | None) -> float:
        """Accounts made from one address: as many as its free sign-in tries, then backoff."""
        return self.signin_address_failures.check([f"signup|{address_key(address)}"])

    def signin_right(self, username: str, address: str | None) -> None:
        self.signin_failures.succeeded(f"u|{username}")
        self.signin_address_failures.forget_one(f"a|{address_key(address)}")


EXTENSION_KEY = "bchat.limits"


def init_app(app) -> Limits:
    limits = app.extensions[EXTENSION_KEY] = Limits(app.config)
    return limits


def get_limits() -> Limits:
    from flask import current_app

    return current_app.extensions[EXTENSION_KEY]
