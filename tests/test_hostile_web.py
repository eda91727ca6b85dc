"""Issue 20, the web parts: redirects, the last 500s, resume bursts, benchmark posts.

Each test here failed before the change it guards: a ``Location: //evil.example``, a 500 (an
import with an object for an id, a ``tool_choice`` whose function is a string, a ``localhost..``
Host), an ``internal`` error frame, a thread per resume frame, an unlimited benchmark post."""

from __future__ import annotations

import copy
import threading

import pytest

from webapp.security import same_site_path

# -- redirects only to same-site paths -------------------------------------------------------------

# Each of these is another site once a browser has dropped tabs and newlines and read
# backslashes as slashes (the WHATWG URL parser does both), or a header that cannot be sent.
OFF_SITE = [
    "https://evil.example/", "//evil.example/", "/\\evil.example", "\\\\evil.example",
    "/\t/evil.example", "/\n/evil.example", "/\r/x", "/\r\nSet-Cookie: a=b", "\t//evil.example",
    " //evil.example", "/ /evil.example", "/\\/evil.example", "/\x00/evil.example",
    "javascript:alert(1)", "evil.example", "", "/" + "a" * 3000,
]


@pytest.mark.parametrize("target", OFF_SITE)
def test_same_site_path_refuses_other_sites(target):
    assert same_site_path(target) == "/"


@pytest.mark.parametrize("target", ["/", "/c/abc", "/c/abc?x=1&y=%2F%2Fz", "/s/tok#frag", "/é"])
def test_same_site_path_keeps_our_paths(target):
    assert same_site_path(target) == target


@pytest.mark.parametrize("encoded", ["/%09/evil.example", "/%0d/x", "/%0a/evil.example",
                                     "/%5C/evil.example", "%2F%2Fevil.example", "/%0d%0aX:%20y"])
def test_passcode_next_cannot_leave_the_site(make_app, encoded):
    app = make_app(PASSCODE="p")
    app.testing = False  # a 500 is answered, as in production, instead of raised
    client = app.test_client()
    # before the passcode: the form keeps the target in a hidden field
    form = client.get(f"/passcode?next={encoded}")
    assert form.status_code == 200
    assert b'name="next" value="/"' in form.data
    entered = client.post(f"/passcode?next={encoded}", data={"passcode": "p"})
    assert entered.status_code == 303 and entered.headers["Location"] == "/"
    # after it: the page redirects at once
    again = client.get(f"/passcode?next={encoded}")
    assert again.status_code == 303 and again.headers["Location"] == "/"
    # a path of ours still goes through
    assert client.get("/passcode?next=/c/abc").headers["Location"] == "/c/abc"


# -- hosts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost..", ".localhost", "a..localhost", "localhost...",
                                  "x" * 64 + ".localhost", "localhost..:5000"])
def test_hosts_no_url_can_hold_get_400(make_app, host):
    app = make_app(ALLOWED_HOSTS=["*"])  # even "any host" means any *name*
    app.testing = False
    client = app.test_client()
    for path in ("/healthz", "/", "/api/conversations", "/nope"):
        response = client.get(path, headers={"Host": host})
        assert response.status_code == 400, (host, path)
        assert response.get_json()["error"]["code"] == "unknown_host"
    assert client.get("/healthz", headers={"Host": "localhost."}).status_code == 200


def test_localhost_dots_refused_with_the_default_hosts(make_app):
    app = make_app()
    app.testing = False
    response = app.test_client().get("/healthz", headers={"Host": "localhost.."})
    assert response.status_code == 400
    assert b"BCHAT_ALLOWED_HOSTS" in response.data


# -- imports: every malformed field is a 400 ----------------------------------------------------------

EXPORT_V2 = {
    "format": "bchat.conversation",
    "version": 2,
    "conversation": {"title": "imported", "created_at": "2026-01-02T03:04:05Z",
                     "settings": {"temperature": 0.5}, "current_message_id": "b"},
    "messages": [
        {"id": "a", "parent_id": None, "role": "user", "content": "hi",
         "created_at": "2026-01-02T03:04:05Z"},
        {"id": "b", "parent_id": "a", "role": "assistant", "content": "hello", "status": "complete",
         "engine": "server", "backend": "llamacpp", "model": "m", "tokens_per_second": 12.5,
         "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
         "meta": {"k": 1}, "created_at": "2026-01-02T03:04:06Z"},
    ],
}

# Where each value is put; every one of them is wrong there.
IMPORT_FIELDS = [
    ("format",), ("version",), ("conversation",), ("conversation", "title"),
    ("conversation", "created_at"), ("conversation", "settings"),
    ("conversation", "current_message_id"), ("messages",), ("messages", 1),
    ("messages", 1, "id"), ("messages", 1, "parent_id"), ("messages", 1, "role"),
    ("messages", 1, "content"), ("messages", 1, "status"), ("messages", 1, "engine"),
    ("messages", 1, "backend"), ("messages", 1, "model"), ("messages", 1, "tokens_per_second"),
    ("messages", 1, "finish_reason"), ("messages", 1, "usage"),
    ("messages", 1, "usage", "prompt_tokens"), ("messages", 1, "usage", "completion_tokens"),
    ("messages", 1, "meta"), ("messages", 1, "created_at"),
]
BAD_VALUES = [{}, {"a": 1}, [], ["a"], [{}], -1, 2**53, 1.5, True, "zz", "x" * 300,
              "2026-13-45", "\u0000"]
# Values that are fine in some fields: not malformed there.
ACCEPTED = {
    ("conversation", "title"): ["zz", "x" * 300, "2026-13-45"],
    ("conversation", "settings"): [{}],
    ("messages", 1, "content"): ["zz", "x" * 300, "2026-13-45"],
    ("messages", 1, "usage"): [{}, {"a": 1}, []],
    ("messages", 1, "meta"): [{}, {"a": 1}],
    ("messages", 1, "tokens_per_second"): [1.5],
    **{("messages", 1, name): ["zz", "2026-13-45"]
       for name in ("backend", "model", "finish_reason")},
}


def _with(path: tuple, value):
    data = copy.deepcopy(EXPORT_V2)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.databases("sqlite", "postgresql")
def test_every_malformed_import_field_gets_a_400(make_app):
    app = make_app()
    app.testing = False  # a 500 is answered, as in production, instead of raised
    client = app.test_client()
    assert client.post("/api/conversations/import", json=EXPORT_V2).status_code == 201
    wrong = []
    for path in IMPORT_FIELDS:
        for value in BAD_VALUES:
            response = client.post("/api/conversations/import", json=_with(path, value))
            accepted = value in ACCEPTED.get(path, [])
            if accepted and response.status_code == 201:
                continue
            body = response.get_json(silent=True) or {}
            code = (body.get("error") or {}).get("code")
            if accepted or response.status_code != 400 or not code:
                wrong.append((path, repr(value)[:20], response.status_code, code))
    assert not wrong, wrong
    # nothing half-written: only the valid imports made conversations
    made = len(client.get("/api/conversations").get_json()["conversations"])
    assert made == 1 + sum(len(values) for values in ACCEPTED.values())


# -- /v1: a tool_choice whose function is not an object ------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def test_v1_tool_choice_with_a_function_that_is_not_an_object_is_a_400(make_app):
    app = make_app()
    app.testing = False
    client = app.test_client()
    client.get("/")
    token = client.post("/api/keys", json={"name": "t"}).get_json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    for function in ("get_weather", ["get_weather"], 3, True, {"name": {}}, {"name": ["a"]}, {}):
        for choice in ({"type": "function", "function": function}, {"function": function}):
            response = client.post("/v1/chat/completions", headers=auth, json={
                "model": "tiny-chat", "max_tokens": 2, "tools": [WEATHER_TOOL],
                "messages": [{"role": "user", "content": "hi"}], "tool_choice": choice})
            assert response.status_code == 400, (choice, response.data[:200])
            assert response.get_json()["error"]["type"] == "invalid_request_error"


# -- socket frames: a client's mistake is a client error frame -----------------------------------


def browser_reply(visitor, content: str = "so far") -> tuple[str, str]:
    """A reply being written in the page (the browser engine): (conversation id, reply id)."""
    _, conv = visitor.json("POST", "/api/conversations", {})
    path = f"/api/conversations/{conv['id']}/messages"
    assert visitor.json("POST", path, {"role": "user", "content": "hi"})[0] == 201
    status, reply = visitor.json("POST", path, {
        "role": "assistant", "content": content, "status": "streaming",
        "provenance": {"engine": "browser", "backend": "wasm-st", "model": "tiny-chat"}})
    assert status == 201 and reply["status"] == "streaming"
    return conv["id"], reply["id"]


def settled(ws) -> list[dict]:
    """Every frame up to the answer to a ping: what the socket sent for the frames before it."""
    ws.send({"type": "ping"})
    _, frames = ws.until("pong")
    return frames[:-1]


MALFORMED = [{}, {"a": 1}, [], ["x"], 1, -1, 1.5, True, None]


def test_frames_with_malformed_fields_get_client_error_frames(make_app, make_live_server):
    server = make_live_server(make_app(RATE_LIMIT="1000/minute", MAX_QUEUED_PER_VISITOR=50))
    visitor = server.session()
    visitor.visit()
    _, reply_id = browser_reply(visitor)
    ws = visitor.ws()
    internal = []
    for kind, field in [("continue", "message_id"), ("regenerate", "message_id"),
                        ("resume", "message_id"), ("stop", "message_id"), ("resume", "offset"),
                        ("regenerate", "model"), ("regenerate", "options"),
                        ("continue", "options"), ("chat", "content"),
                        ("chat", "conversation_id"), ("chat", "options"), ("chat", "settings"),
                        ("compare", "targets"), ("chat", "request_id")]:
        for value in MALFORMED:
            frame = {"type": kind, "message_id": reply_id, "content": "", field: value}
            if kind == "stop" and value is None:
                continue  # no message_id: stop everything this socket watches (nothing)
            ws.send(frame)
            for answer in settled(ws):
                if answer["type"] == "error" and answer.get("code") == "internal":
                    internal.append((kind, field, value))
    assert not internal, internal
    ws.send({"type": "continue", "message_id": {"id": reply_id}})
    error, _ = ws.until("error")
    assert error["code"] == "bad_frame" and "message_id" in error["message"]
    ws.close()


def reconstruct(frames: list[dict], message_id: str) -> str:
    text = ""
    for frame in frames:
        if frame["type"] == "token" and frame["message_id"] == message_id:
            text = text[:frame["offset"]] + frame["text"]
    return text


def follow_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bchat-run-follow"]


def test_resume_bursts_reuse_one_follower_per_reply(app, live_server):
    runs = app.extensions["bchat"].runs
    visitor = live_server.session()
    visitor.visit()
    conv_id, reply_id = browser_reply(visitor, "so far")
    ws = visitor.ws()
    settled(ws)  # the socket's own threads are running
    before = threading.active_count()
    for i in range(300):
        ws.send({"type": "resume", "message_id": reply_id, "offset": i % 3})
    frames = settled(ws)
    assert len(follow_threads()) == 1
    assert threading.active_count() <= before + 2  # the follower, and slack for a late one
    assert runs.followers() == 1
    assert not [f for f in frames if f["type"] == "error"], frames[:3]

    # the page finishes its reply: the socket gets it, whole, and once
    status, _ = visitor.json("PATCH", f"/api/conversations/{conv_id}/messages/{reply_id}",
                             {"content": "so far, and the end", "status": "complete"})
    assert status == 200
    done, more = ws.until("done")
    frames += more
    assert done["message"]["content"] == "so far, and the end"
    assert reconstruct(frames, reply_id) in ("so far", "so far, and the end")
    for thread in follow_threads():
        thread.join(10)
    assert not follow_threads() and runs.followers() == 0
    assert [f for f in settled(ws) if f["type"] == "done"] == []
    # a resume now gets the stored reply from the database, without a follower
    ws.send({"type": "resume", "message_id": reply_id, "offset": 0})
    again, _ = ws.until("done")
    assert again["message"]["content"] == "so far, and the end"
    assert not follow_threads()
    ws.close()


def test_followers_end_when_the_socket_closes(app, live_server, monkeypatch):
    import webapp.limits

    monkeypatch.setattr(webapp.limits, "MAX_FOLLOWS", 2)
    runs = app.extensions["bchat"].runs
    visitor = live_server.session()
    visitor.visit()
    replies = [browser_reply(visitor)[1] for _ in range(3)]
    ws = visitor.ws()
    for reply_id in replies[:2]:
        for _ in range(20):
            ws.send({"type": "resume", "message_id": reply_id, "offset": 0})
    assert not [f for f in settled(ws) if f["type"] == "error"]
    assert runs.followers() == 2 and len(follow_threads()) == 2
    # a third reply is one too many for this visitor, on this socket or another one
    ws.send({"type": "resume", "message_id": replies[2], "offset": 0})
    error, _ = ws.until("error")
    assert error["code"] == "rate_limited" and "follow 2 replies" in error["message"]
    other_tab = visitor.ws()
    other_tab.send({"type": "resume", "message_id": replies[2], "offset": 0})
    assert other_tab.until("error")[0]["code"] == "rate_limited"
    threads = follow_threads()
    ws.close()
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads)
    assert runs.followers() == 0
    # the closed socket's followers are gone: the other tab may follow now
    other_tab.send({"type": "resume", "message_id": replies[2], "offset": 0})
    assert not [f for f in settled(other_tab) if f["type"] == "error"]
    assert runs.followers() == 1
    other_tab.close()


# -- benchmark posts: limited per visitor and per address, removable by an admin ----------------

BROWSER_RUN = {"backend": "wasm-st", "model": "tiny-chat",
               "results": [{"prompt": "short", "prompt_tokens": 20, "decode_tps": 15.5}]}


def test_benchmark_posts_are_limited_per_visitor_and_per_address(make_app):
    app = make_app(BENCHMARK_RATE_LIMIT="2/hour", RATE_LIMIT_IP_FACTOR=2)
    first, second, third = (app.test_client() for _ in range(3))
    for client in (first, second, third):
        client.get("/")
    # refused posts do not count
    for _ in range(3):
        bad = first.post("/api/benchmarks", json={**BROWSER_RUN, "backend": "gpu"})
        assert bad.status_code == 400
    assert [first.post("/api/benchmarks", json=BROWSER_RUN).status_code for _ in range(2)] == [201, 201]
    limited = first.post("/api/benchmarks", json=BROWSER_RUN)
    assert limited.status_code == 429
    assert limited.get_json()["error"]["code"] == "rate_limited"
    assert 3000 <= int(limited.headers["Retry-After"]) <= 3600
    # fresh cookies from the same address: the address's limit (2 x 2) holds
    assert [second.post("/api/benchmarks", json=BROWSER_RUN).status_code for _ in range(2)] == [201, 201]
    assert third.post("/api/benchmarks", json=BROWSER_RUN).status_code == 429
    # another address is not held back by this one
    elsewhere = third.post("/api/benchmarks", json=BROWSER_RUN,
                           environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert elsewhere.status_code == 201
    assert len(first.get("/api/benchmarks").get_json()["benchmarks"]) == 5


def test_an_admin_removes_a_benchmark_post(make_app, db_url, tiny_model):
    import os
    import subprocess
    import sys
    from pathlib import Path

    app = make_app()
    client = app.test_client()
    client.get("/")
    kept, spam = (client.post("/api/benchmarks", json=BROWSER_RUN).get_json() for _ in range(2))
    env = {**os.environ, "BCHAT_DATABASE_URL": db_url, "BCHAT_MODEL_PATH": str(tiny_model),
           "BCHAT_SECRET_KEY": "x"}

    def bchat(*args):
        return subprocess.run([sys.executable, "-m", "webapp.cli", "bench", *args], env=env,
                              capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parent.parent)

    listed = bchat("--list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert spam["id"] in listed.stdout and kept["id"] in listed.stdout
    removed = bchat("--remove", spam["id"])
    assert removed.returncode == 0 and f"removed {spam['id']}" in removed.stdout
    ids = [b["id"] for b in client.get("/api/benchmarks").get_json()["benchmarks"]]
    assert ids == [kept["id"]]
    again = bchat("--remove", spam["id"])
    assert again.returncode == 1 and "no such benchmark" in again.stderr
