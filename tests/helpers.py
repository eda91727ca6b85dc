"""A minimal visitor for tests: a cookie jar, JSON calls, and a real websocket client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from typing import Any

import websocket  # websocket-client


class HttpSession:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.cookies = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def request(self, method: str, path: str, body: Any = None, headers=None):
        data = None
        headers = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _headers, raw = self.request(method, path, body)
        return status, (json.loads(raw) if raw else None)

    def continue_share(self, path: str, csrf: str) -> tuple[int, str | None]:
        """Post a shared page's "Continue" form (``path``: the share's /s/<token>) without
        following its redirect: (status, the new conversation's id from the Location)."""
        import urllib.parse

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies),
                                             NoRedirect())
        request = urllib.request.Request(self.base_url + path + "/continue", method="POST",
                                         data=urllib.parse.urlencode({"csrf": csrf}).encode())
        try:
            with opener.open(request) as response:
                return response.status, None
        except urllib.error.HTTPError as err:
            location = err.headers.get("Location", "")
            return err.code, location.rsplit("/c/", 1)[-1] if "/c/" in location else None

    def visit(self) -> None:
        status, _h, _b = self.request("GET", "/")
        assert status == 200

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.cookies)

    def ws(self, *, origin: str | None = "own", timeout: float = 30) -> ChatClient:
        if not list(self.cookies):
            self.visit()
        url = self.base_url.replace("http://", "ws://") + "/ws"
        kwargs: dict[str, Any] = {"timeout": timeout, "cookie": self.cookie_header()}
        if origin == "own":
            kwargs["origin"] = self.base_url
        elif origin is None:
            kwargs["suppress_origin"] = True
        else:
            kwargs["origin"] = origin
        return ChatClient(websocket.create_connection(url, **kwargs))


class ChatClient:
    """Sends frames and collects them until a frame of a wanted type arrives."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def send(self, frame: dict | str) -> None:
        self.conn.send(frame if isinstance(frame, str) else json.dumps(frame))

    def recv(self) -> dict:
        return json.loads(self.conn.recv())

    def until(self, *types: str) -> tuple[dict, list[dict]]:
        """Read frames until one of ``types``; returns (that frame, every frame read)."""
        seen = []
        while True:
            frame = self.recv()
            seen.append(frame)
            if frame["type"] in types:
                return frame, seen

    def chat(self, content: str, conversation_id: str | None = None, **extra) -> dict:
        frame = {"type": "chat", "conversation_id": conversation_id, "content": content}
        frame.update(extra)
        self.send(frame)
        return frame

    def close(self) -> None:
        self.conn.close()


def text_of(frames: list[dict]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc=None, timeout: float = 60) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {output}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def timed_reply(client: ChatClient, content: str, **extra) -> tuple[float, float, float, dict]:
    """Send a chat and read its frames: (sent, first token, end) perf_counter times and the
    stored reply (``done``'s message, or ``error``'s failed reply). For benchmarks."""
    import time

    sent = time.perf_counter()
    client.chat(content, **extra)
    first = None
    while True:
        frame = client.recv()
        if frame["type"] == "token" and first is None:
            first = time.perf_counter()
        if frame["type"] in ("done", "error"):
            end = time.perf_counter()
            return sent, first or end, end, frame.get("message") or frame.get("reply")
