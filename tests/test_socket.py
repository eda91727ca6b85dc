"""The websocket protocol on a real app, a real socket and a real database (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import websocket
from helpers import text_of

pytestmark = pytest.mark.databases("sqlite", "postgresql")

GREEDY = {"temperature": 0, "max_tokens": 16}


def conversation(session, conversation_id):
    status, body = session.json("GET", f"/api/conversations/{conversation_id}")
    assert status == 200
    return body


def test_chat_streams_and_stores_both_messages(live_server):
    visitor = live_server.session()
    ws = visitor.ws()
    ws.chat("hello model", options=GREEDY)
    started, _ = ws.until("started")
    assert started["user_message"]["content"] == "hello model"
    assert started["user_message"]["role"] == "user"
    done, frames = ws.until("done")
    tokens = [f for f in frames if f["type"] == "token"]
    assert len(tokens) >= 2
    reply = done["message"]
    assert reply["id"] == started["message_id"]
    assert reply["content"] == text_of(frames) and reply["content"]
    assert reply["status"] == "complete"
    assert reply["engine"] == "server" and reply["backend"] == "llamacpp"
    assert reply["model"] == "tiny-chat"
    assert reply["usage"]["completion_tokens"] == 16
    assert reply["usage"]["prompt_tokens"] > 0
    assert reply["tokens_per_second"] > 0
    assert reply["finish_reason"] == "length"

    stored = conversation(visitor, started["conversation_id"])
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][1] == reply
    assert stored["title"] == "hello model"

    # a second turn in the same conversation sees the history
    ws.chat("and again", started["conversation_id"], options=GREEDY)
    done2, _ = ws.until("done")
    assert done2["message"]["usage"]["prompt_tokens"] > reply["usage"]["prompt_tokens"]
    assert len(conversation(visitor, started["conversation_id"])["messages"]) == 4
    ws.close()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_frame"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps({"type": "chat", "content": "   "}), "empty_content"),
        (json.dumps({"type": "chat", "content": 42}), "bad_content"),
        (json.dumps({"type": "chat", "content": "x" * 40_000}), "content_too_long"),
        (json.dumps({"type": "chat", "content": "hi", "conversation_id": "nope"}), "not_found"),
        (json.dumps({"type": "chat", "content": "hi", "model": "gpt-17"}), "unknown_model"),
        (json.dumps({"type": "chat", "content": "hi", "options": {"temperature": 9}}), "bad_options"),
        (json.dumps({"type": "chat", "content": "hi", "options": {"max_tokens": 0}}), "bad_options"),
        (json.dumps({"type": "chat", "content": "hi", "options": {"color": 1}}), "bad_options"),
    ],
)
def test_bad_input_gets_an_error_frame_and_the_socket_stays_usable(live_server, raw, code):
    visitor = live_server.session()
    ws = visitor.ws()
    ws.send(raw)
    error = ws.recv()
    assert error["type"] == "error" and error["code"] == code and error["message"]
    ws.chat("still works", options=GREEDY)
    done, _ = ws.until("done")
    assert done["message"]["status"] == "complete"
    # nothing was stored for the bad frame: only the good exchange exists
    status, body = visitor.json("GET", "/api/conversations")
    assert len(body["conversations"]) == 1
    ws.close()


def test_binary_frame_is_refused(live_server):
    ws = live_server.session().ws()
    ws.conn.send_binary(b"\x00\x01")
    assert ws.recv()["code"] == "bad_frame"
    ws.close()


def test_second_chat_in_the_same_conversation_is_refused_but_another_runs_alongside(live_server):
    visitor = live_server.session()
    ws = visitor.ws()
    ws.chat("long one", options={"temperature": 0, "max_tokens": 600})
    started, _ = ws.until("started")
    ws.until("token")
    ws.chat("impatient", started["conversation_id"], request_id="r2")
    error, _ = ws.until("error")
    assert error["code"] == "busy" and error["request_id"] == "r2"
    # Nothing half-written: the refused message was not stored.
    assert len(conversation(visitor, started["conversation_id"])["messages"]) == 2
    # Another conversation may be written at the same time, on the same socket.
    ws.chat("meanwhile elsewhere", options=GREEDY)
    other, _ = ws.until("started")
    assert other["conversation_id"] != started["conversation_id"]
    finished = {}
    while len(finished) < 2:
        frame, _ = ws.until("done")
        finished[frame["message_id"]] = frame["message"]
    assert finished[started["message_id"]]["status"] == "complete"
    assert finished[other["message_id"]]["status"] == "complete"
    ws.close()


def test_stop_keeps_the_partial_reply_marked_stopped(live_server):
    visitor = live_server.session()
    ws = visitor.ws()
    ws.chat("tell me everything", options={"temperature": 0, "max_tokens": 3000})
    started, _ = ws.until("started")
    ws.until("token")
    ws.send({"type": "stop"})
    done, frames = ws.until("done")
    reply = done["message"]
    assert reply["status"] == "stopped"
    assert reply["meta"]["stop_reason"] == "user"
    assert 0 < reply["usage"]["completion_tokens"] < 3000
    assert reply["content"]
    stored = conversation(visitor, started["conversation_id"])["messages"][-1]
    assert stored["status"] == "stopped" and stored["content"] == reply["content"]
    ws.close()


def test_disconnect_past_the_grace_period_stops_generation_and_stores_partial(
    make_app, make_live_server
):
    live_server = make_live_server(make_app(RUN_GRACE_SECONDS=0))
    visitor = live_server.session()
    ws = visitor.ws()
    ws.chat("a long answer please", options={"temperature": 0, "max_tokens": 4000})
    started, _ = ws.until("started")
    ws.until("token")
    ws.conn.close()
    deadline = time.time() + 30  # a bound for a busy machine, not a speed target
    messages = []
    while time.time() < deadline:
        messages = conversation(visitor, started["conversation_id"])["messages"]
        if messages[1]["status"] != "streaming":
            break
        time.sleep(0.1)
    assert messages[1]["status"] != "streaming", "the partial reply is stored once the socket is gone"
    reply = messages[1]
    assert reply["status"] == "stopped"
    assert reply["meta"]["stop_reason"] == "disconnect"
    assert 0 < reply["usage"]["completion_tokens"] < 4000
    # the model is free again: a new socket gets a reply straight away
    ws2 = visitor.ws()
    ws2.chat("next", options=GREEDY)
    frame, frames = ws2.until("done")
    assert not any(f["type"] == "queued" for f in frames)
    ws2.close()


def test_two_clients_at_once_both_complete_in_order(live_server):
    results = {}
    a_started = threading.Event()

    def chat(name: str, after: threading.Event | None) -> None:
        if after is not None:
            assert after.wait(60)  # b arrives once a's reply exists: an event, not a sleep
        ws = live_server.session().ws()
        ws.chat(f"from {name}", options={"temperature": 0, "max_tokens": 300})
        started, _ = ws.until("started")
        if name == "a":
            a_started.set()
        done, frames = ws.until("done")
        results[name] = (started, done, frames)
        ws.close()

    threads = [threading.Thread(target=chat, args=("a", None)),
               threading.Thread(target=chat, args=("b", a_started))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    a, b = results["a"][1]["message"], results["b"][1]["message"]
    assert a["status"] == "complete" and b["status"] == "complete"
    # Served in arrival order: a's reply was taken (and stored) before b's; both run to the end.
    assert a["created_at"] <= b["created_at"], "served in arrival order"
    assert b["usage"]["completion_tokens"] == 300


def test_context_too_long_is_an_error_and_the_user_message_is_kept(make_app, make_live_server):
    server = make_live_server(make_app(N_CTX=128))
    visitor = server.session()
    ws = visitor.ws()
    ws.chat("water " * 300)
    started, _ = ws.until("started")
    error, _ = ws.until("error")
    assert error["code"] == "context_too_long"
    assert "128" in error["message"]
    assert error["reply"]["status"] == "failed"
    messages = conversation(visitor, started["conversation_id"])["messages"]
    assert messages[0]["content"] == "water " * 300
    assert messages[1]["status"] == "failed"
    assert messages[1]["meta"]["error"]["code"] == "context_too_long"
    ws.chat("short now", started["conversation_id"], options=GREEDY)
    done, _ = ws.until("done")
    assert done["message"]["status"] == "complete"
    ws.close()


def test_model_failure_stores_what_was_produced_as_failed(live_server):
    """A model that breaks mid-reply: the partial text is stored with status failed."""
    from webapp.engines.base import EngineError

    services = live_server.app.extensions["bchat"]
    engine = services.engines.engines[0]
    real_stream = engine.stream

    def breaking_stream(model, messages, options, cancel):
        for i, chunk in enumerate(real_stream(model, messages, options, cancel)):
            if i == 5:
                cancel.set()
                raise EngineError("the model process died", code="model_failed")
            yield chunk

    engine.stream = breaking_stream
    visitor = live_server.session()
    ws = visitor.ws()
    ws.chat("break please", options={"temperature": 0, "max_tokens": 100})
    started, _ = ws.until("started")
    error, frames = ws.until("error")
    assert error["code"] == "model_failed"
    partial = text_of(frames)
    assert partial
    stored = conversation(visitor, started["conversation_id"])["messages"][-1]
    assert stored["status"] == "failed" and stored["content"] == partial
    ws.close()


@pytest.mark.parametrize("origin", ["http://evil.example", None])
def test_handshake_refused_for_foreign_or_missing_origin(live_server, origin):
    visitor = live_server.session()
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        visitor.ws(origin=origin)
    assert info.value.status_code == 403


def test_handshake_allows_configured_extra_origin(make_app, make_live_server):
    server = make_live_server(make_app(ALLOWED_ORIGINS=["https://chat.example.org"]))
    ws = server.session().ws(origin="https://chat.example.org")
    ws.send({"type": "ping"})
    assert ws.recv() == {"type": "pong"}
    ws.close()


def test_handshake_refused_without_owner_cookie(live_server):
    url = live_server.url.replace("http://", "ws://") + "/ws"
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(url, origin=live_server.url, timeout=5)
    assert info.value.status_code == 403


def test_someone_elses_conversation_is_not_found_over_the_socket(live_server):
    owner = live_server.session().ws()
    owner.chat("mine", options=GREEDY)
    started, _ = owner.until("started")
    owner.until("done")
    intruder = live_server.session().ws()
    intruder.chat("let me in", started["conversation_id"])
    error = intruder.recv()
    assert error["code"] == "not_found"
    owner.close()
    intruder.close()


def test_a_resume_error_names_the_reply_it_concerns(live_server):
    """A page resuming several replies at once can tell which one failed."""
    visitor = live_server.session()
    ws = visitor.ws()
    ws.chat("hello", options=GREEDY)
    started, _ = ws.until("started")
    ws.until("done")
    stranger = live_server.session().ws()
    stranger.chat("not yours", options=GREEDY)
    theirs, _ = stranger.until("started")
    stranger.until("done")
    ws.send({"type": "resume", "message_id": theirs["message_id"], "offset": 0, "request_id": 7})
    ws.send({"type": "resume", "message_id": started["message_id"], "offset": 0})
    ws.send({"type": "resume", "message_id": "no-such-reply", "offset": "0"})
    frames = {f["message_id"]: f for f in (ws.recv() for _ in range(3))}
    assert frames[started["message_id"]]["type"] == "done"
    refused = frames[theirs["message_id"]]
    assert refused["type"] == "error" and refused["code"] == "not_found"
    assert refused["request_id"] == 7
    assert frames["no-such-reply"]["code"] == "bad_frame"
    ws.close()
    stranger.close()


def test_an_oversized_frame_closes_with_1009_and_frees_the_server_thread(make_app, make_live_server):
    server = make_live_server(make_app(WS_MAX_FRAME_BYTES=1024))

    def handler_threads() -> int:
        return sum(t.name.startswith("Thread") and "process_request" in t.name
                   for t in threading.enumerate())

    ws = server.session().ws()
    busy = handler_threads()
    ws.send("x" * 5000)
    opcode, frame = ws.conn.recv_data_frame(True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 1009
    deadline = time.time() + 30  # a bound for a busy machine, not a speed target
    while handler_threads() >= busy and time.time() < deadline:
        time.sleep(0.05)
    assert handler_threads() < busy, "the server thread is released without the client closing"
    ws.close()
