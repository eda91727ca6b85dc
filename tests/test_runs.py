"""Durable replies: runs outlive sockets, resume exactly, fail per request, and are limited."""

from __future__ import annotations

import json
import threading

import openai
import pytest
from helpers import text_of
from tiny_model import write_tiny_model

GREEDY = {"temperature": 0, "max_tokens": 16}

# A template that refuses a marker, as Mistral's and Gemma's refuse two user turns in a row.
RAISING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if 'BOOM' in message['content'] %}{{ raise_exception('the template refuses BOOM') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversation(session, conversation_id):
    status, body = session.json("GET", f"/api/conversations/{conversation_id}")
    assert status == 200
    return body


class Reader:
    """Collects one reply's text by the offsets its token frames carry."""

    def __init__(self, client, message_id: str, text: str = "") -> None:
        self.client, self.message_id, self.text = client, message_id, text
        self.frames: list[dict] = []

    def read_until_final(self) -> dict:
        while True:
            frame = self.client.recv()
            self.frames.append(frame)
            if frame.get("message_id") != self.message_id:
                continue
            if frame["type"] == "token":
                assert frame["offset"] <= len(self.text), "a gap in the offsets"
                self.text = self.text[: frame["offset"]] + frame["text"]
            if frame["type"] in ("done", "error"):
                return frame


def start_long_reply(visitor, max_tokens=2000):
    ws = visitor.ws()
    ws.chat("tell me a long story", options={"temperature": 0, "max_tokens": max_tokens})
    started, _ = ws.until("started")
    reader = Reader(ws, started["message_id"])
    while len(reader.text) < 40:
        frame = ws.recv()
        if frame["type"] == "token":
            reader.text = reader.text[: frame["offset"]] + frame["text"]
    return ws, started, reader


def test_resume_on_a_new_socket_gives_exactly_the_stored_reply(live_server):
    visitor = live_server.session()
    ws, started, reader = start_long_reply(visitor)
    had = reader.text
    ws.conn.close()  # the tab's connection drops; the run goes on (grace period)

    ws2 = visitor.ws()
    ws2.send({"type": "resume", "message_id": started["message_id"], "offset": len(had)})
    resumed = Reader(ws2, started["message_id"], had)
    final = resumed.read_until_final()
    assert final["type"] == "done"
    stored = final["message"]
    assert stored["status"] == "complete" and stored["usage"]["completion_tokens"] == 2000
    assert resumed.text == stored["content"]
    assert stored["content"].startswith(had) and len(stored["content"]) > len(had)
    assert conversation(visitor, started["conversation_id"])["messages"][1] == stored

    # A finished reply answers "done" at once.
    ws2.send({"type": "resume", "message_id": started["message_id"], "offset": 0})
    frame = ws2.recv()
    assert frame["type"] == "done" and frame["message"] == stored
    ws2.close()


def test_a_resume_overlapping_live_frames_shows_each_character_once(live_server):
    visitor = live_server.session()
    ws, started, reader = start_long_reply(visitor, max_tokens=600)
    ws.send({"type": "resume", "message_id": started["message_id"], "offset": 5})
    final = reader.read_until_final()
    assert final["type"] == "done"
    assert reader.text == final["message"]["content"]
    ws.close()


def test_resume_and_stop_are_refused_for_someone_elses_reply(live_server):
    owner = live_server.session()
    ws, started, reader = start_long_reply(owner, max_tokens=300)
    stranger = live_server.session().ws()
    stranger.send({"type": "resume", "message_id": started["message_id"], "offset": 0})
    frame = stranger.recv()
    assert frame["type"] == "error" and frame["code"] == "not_found"
    stranger.send({"type": "stop", "message_id": started["message_id"]})
    stranger.send({"type": "ping"})
    assert stranger.recv()["type"] == "pong"
    final = reader.read_until_final()
    assert final["message"]["status"] == "complete", "a stranger's stop did nothing"
    for bad in ({"offset": -1}, {"offset": "3"}, {"message_id": 5}):
        stranger.send({"type": "resume", "message_id": "x", "offset": 0, **bad})
        frame = stranger.recv()
        assert frame["type"] == "error" and frame["code"] in ("bad_frame", "not_found")
    ws.close()
    stranger.close()


def test_stop_from_another_socket_of_the_same_visitor(live_server):
    visitor = live_server.session()
    ws, started, reader = start_long_reply(visitor, max_tokens=4000)
    other = visitor.ws()
    other.send({"type": "stop", "message_id": started["message_id"]})
    final = reader.read_until_final()
    assert final["message"]["status"] == "stopped"
    assert final["message"]["meta"]["stop_reason"] == "user"
    assert final["message"]["content"] == reader.text
    ws.close()
    other.close()


def test_rate_limits_come_before_any_model_call(make_app, make_live_server):
    server = make_live_server(make_app(RATE_LIMIT="2/minute"))
    visitor = server.session()
    ws = visitor.ws()
    for i in range(2):
        ws.chat(f"message {i}", options=GREEDY)
        ws.until("done")
    ws.chat("one too many", options=GREEDY)
    error, _ = ws.until("error")
    assert error["code"] == "rate_limited" and 1 <= error["retry_after"] <= 60
    status, listing = visitor.json("GET", "/api/conversations")
    assert len(listing["conversations"]) == 2, "the refused message was not stored"
    ws.close()


def test_replies_at_once_per_visitor_are_limited(make_app, make_live_server):
    server = make_live_server(make_app(MAX_QUEUED_PER_VISITOR=1))
    visitor = server.session()
    ws = visitor.ws()
    ws.chat("first", options={"temperature": 0, "max_tokens": 2000})
    started, _ = ws.until("started")
    ws.chat("second, elsewhere", options=GREEDY)
    error, _ = ws.until("error")
    assert error["code"] == "too_many_queued"
    # Another visitor is not held back by this one's limit.
    other = server.session().ws()
    other.chat("hello", options=GREEDY)
    done, _ = other.until("done")
    assert done["message"]["status"] == "complete"
    ws.send({"type": "stop"})
    ws.until("done")
    ws.close()
    other.close()


@pytest.mark.parametrize("parallel", [1, 4], ids=["one-at-a-time", "batched"])
def test_a_template_that_raises_fails_that_chat_only(make_app, make_live_server, tmp_path, parallel):
    model = write_tiny_model(tmp_path / "strict-chat.gguf", chat_template=RAISING_TEMPLATE)
    server = make_live_server(make_app(MODEL_PATH=str(model), PARALLEL=parallel))
    visitor = server.session()
    ws = visitor.ws()
    ws.chat("BOOM goes the template", options=GREEDY)
    started, _ = ws.until("started")
    error, _ = ws.until("error")
    # The template refusing the conversation is the caller's to fix (a 400 on /v1, as
    # llama-server answers), not the model failing.
    assert error["code"] == "template_refused" and "BOOM" in error["message"]
    assert error["reply"]["status"] == "failed"
    for i in range(3):  # the same conversation goes on: the refused turn is not sent again
        ws.chat(f"fine message {i}", started["conversation_id"], options=GREEDY)
        done, _ = ws.until("done")
        assert done["message"]["status"] == "complete"
    client = server.openai_client()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            reply = client.chat.completions.create(
                model="strict-chat", messages=[{"role": "user", "content": "BOOM again"}],
                max_tokens=4, stream=stream)
            list(reply) if stream else None
        assert refused.value.status_code == 400
        assert refused.value.body["code"] == "invalid_value" and refused.value.body["param"] == "messages"
    status, health = visitor.json("GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    ws.close()


@pytest.mark.parametrize("parallel", [1, 4], ids=["one-at-a-time", "batched"])
def test_a_lone_surrogate_fails_that_request_only_on_both_workers(make_app, parallel):
    import threading as _threading

    from webapp.engines.base import EngineError, Finished
    from webapp.options import GenerationOptions

    app = make_app(PARALLEL=parallel)
    engine = app.extensions["bchat"].engines.engines[0]
    bad = GenerationOptions(system="\ud800", temperature=0, max_tokens=8)
    with pytest.raises(EngineError) as failure:
        list(engine.stream("tiny-chat", [{"role": "user", "content": "hi"}], bad, _threading.Event()))
    assert failure.value.code == "model_failed"
    for i in range(3):
        chunks = list(engine.stream("tiny-chat", [{"role": "user", "content": f"hi {i}"}],
                                    GenerationOptions(temperature=0, max_tokens=8), _threading.Event()))
        assert isinstance(chunks[-1], Finished) and chunks[-1].completion_tokens == 8


def test_the_socket_refuses_a_lone_surrogate_with_an_error_frame(live_server):
    ws = live_server.session().ws()
    ws.send('{"type": "chat", "content": "hi", "options": {"system": "\\ud800"}}')
    frame = ws.recv()
    assert frame["type"] == "error" and frame["code"] == "bad_text"
    ws.chat("still works", options=GREEDY)
    done, _ = ws.until("done")
    assert done["message"]["status"] == "complete"
    ws.close()


def test_bchat_worker_survives_a_bad_request(tiny_model):
    import urllib.error
    import urllib.request

    from helpers import free_port
    from test_upstreams import start_worker, stop

    port = free_port()
    proc = start_worker(tiny_model, port)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def post(body: str) -> tuple[int, dict]:
            request = urllib.request.Request(url, data=body.encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        status, body = post('{"model": "tiny-chat", "max_tokens": 8, "messages": '
                            '[{"role": "system", "content": "\\ud800"}, {"role": "user", "content": "hi"}]}')
        assert status >= 400 and body["error"]["message"]
        for i in range(3):
            status, body = post(json.dumps({"model": "tiny-chat", "max_tokens": 8, "temperature": 0,
                                            "messages": [{"role": "user", "content": f"hi {i}"}]}))
            assert status == 200 and body["usage"]["completion_tokens"] == 8
    finally:
        stop(proc)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_healthz_names_a_dead_inference_thread(make_app):
    from webapp.engines.base import EngineError
    from webapp.options import GenerationOptions

    app = make_app(PARALLEL=4)
    client = app.test_client()
    engine = app.extensions["bchat"].engines.engines[0]
    worker = engine.worker("tiny-chat")
    worker.wait_loaded()
    assert client.get("/healthz").status_code == 200

    def die(*_args):  # what no per-request handler can catch
        raise SystemExit("simulated death of the inference thread")

    worker._step = die
    cancel = threading.Event()
    chunks = engine.stream("tiny-chat", [{"role": "user", "content": "hi"}],
                           GenerationOptions(max_tokens=4), cancel, heartbeat=0.05)
    # The thread dies on its first step: the chat it held fails at once instead of waiting.
    with pytest.raises(EngineError) as failed:
        for _ in chunks:
            pass
    assert failed.value.code == "model_crashed"
    worker._thread.join(10)
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unhealthy"
    assert body["problems"] == [{"model": "tiny-chat", "problem": "dead",
                                 "message": "the inference thread of tiny-chat has stopped"}]
    cancel.set()


def test_healthz_names_a_stuck_inference_thread(make_app):
    from webapp.options import GenerationOptions

    app = make_app(PARALLEL=4, WATCHDOG_SECONDS=0.2)
    client = app.test_client()
    engine = app.extensions["bchat"].engines.engines[0]
    worker = engine.worker("tiny-chat")
    worker.wait_loaded()
    release, entered = threading.Event(), threading.Event()
    real_step = worker._step

    def hang():
        entered.set()
        release.wait(30)
        real_step()

    worker._step = hang
    cancel = threading.Event()
    chunks = engine.stream("tiny-chat", [{"role": "user", "content": "hi"}],
                           GenerationOptions(max_tokens=4, temperature=0), cancel)
    thread = threading.Thread(target=lambda: list(chunks), daemon=True)
    thread.start()
    assert entered.wait(10)
    threading.Event().wait(0.4)  # the watchdog's threshold must pass: this is the condition tested
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["problems"][0]["problem"] == "stuck"
    worker._step = real_step
    release.set()
    thread.join(10)
    assert client.get("/healthz").status_code == 200


def test_history_never_has_two_turns_of_one_role_in_a_row(make_app):
    from webapp.models import Provenance

    app = make_app()
    chats = app.extensions["bchat"].chats
    conv, _ = chats.add_user_message("owner", None, "first question")
    chats.add_reply("owner", conv["id"], "", "failed", Provenance(engine="browser"))
    chats.add_user_message("owner", conv["id"], "asked again")
    chats.add_reply("owner", conv["id"], "a partial answer", "stopped", Provenance(engine="browser"))
    chats.add_user_message("owner", conv["id"], "and now?")
    history = chats.history("owner", conv["id"])
    roles = [turn["role"] for turn in history]
    assert all(a != b for a, b in zip(roles, roles[1:], strict=False)), roles
    assert [t["content"] for t in history] == ["asked again", "a partial answer", "and now?"]


def test_stale_streaming_rows_become_interrupted_with_their_text(make_app):
    """A row left "streaming" by a process that is gone is closed on the next start."""
    from webapp.models import Provenance

    app = make_app()
    services = app.extensions["bchat"]
    _c, _u, (reply,), _h = services.chats.begin_turn(
        "owner", None, "hello", [Provenance(engine="server", model="tiny-chat")],
        run_owner="another-host|4242|dead",
    )
    services.runs.rows.flush({reply["id"]: "half a repl"}, [])
    assert services.runs.keeper.reap_stale() == 0, "another host's fresh lease is respected"
    from webapp.runs.keeper import HOST

    _c, _u, (reply2,), _h = services.chats.begin_turn(
        "owner", None, "hello again", [Provenance(engine="server")], run_owner=f"{HOST}|999999|gone",
    )
    assert services.runs.keeper.reap_stale() == 1, "a pid that no longer exists on this host is dead"
    _, stored = services.runs.rows.reply_state("owner", reply2["id"])
    assert stored["status"] == "interrupted"
    assert stored["meta"]["stop_reason"] == "server_restart"
    _, first = services.runs.rows.reply_state("owner", reply["id"])
    assert first["status"] == "streaming" and first["content"] == "half a repl"


def test_tokens_frames_carry_offsets_that_add_up(live_server):
    ws = live_server.session().ws()
    ws.chat("count", options={"temperature": 0, "max_tokens": 64})
    done, frames = ws.until("done")
    tokens = [f for f in frames if f["type"] == "token"]
    position = 0
    for frame in tokens:
        assert frame["offset"] == position
        position += len(frame["text"])
    assert text_of(frames) == done["message"]["content"]
    ws.close()


@pytest.mark.parametrize("store", [True, False])
def test_a_shutdown_interrupts_a_reply_stored_or_not(make_app, store):
    """One outcome for every run: a /v1 call kept only in memory ends "interrupted" at a
    shutdown, as a stored reply does (it used to say "stopped")."""
    from webapp.options import GenerationOptions

    app = make_app()
    runs = app.extensions["bchat"].runs
    growing = threading.Event()

    class Watcher:
        active = True
        frames: list[dict] = []

        def deliver(self, frame):
            self.frames.append(frame)
            if frame["type"] == "token":
                growing.set()

    watcher = Watcher()
    [run] = runs.start_api("owner", [{"role": "user", "content": "tell me a long story"}],
                         model=None, options=GenerationOptions(temperature=0, max_tokens=2000),
                         store=store, watcher=watcher)
    assert growing.wait(60), "the model started writing"
    runs.shutdown()
    assert run.finished.wait(60)
    final = watcher.frames[-1]
    assert final["type"] == "done" and final["message_id"] == run.message_id
    assert final["message"]["status"] == "interrupted"
    assert final["message"]["meta"]["stop_reason"] == "shutdown"
    assert final["message"]["content"] == run.text != ""
