"""Embedded models in supervised runner processes: a native crash costs the replies in flight,
never the site.

Real runner processes (llama.cpp on the tiny model, and SmolLM2 where the CPU matters), a real
websocket on a real socket, SQLite files and PostgreSQL. A runner is killed with SIGKILL (what
the OOM killer sends) and SIGSEGV (what a llama.cpp bug gets) in the middle of a reply.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import HttpSession, free_port, wait_for_http

from webapp.model_runner import LOAD_CRASH_LIMIT, RunnerSupervisor, describe_exit
from webapp.options import GenerationOptions


def runner_app(make_app, **overrides):
    return make_app(MODEL_RUNNER="process", MAX_TOKENS_LIMIT=4000, **overrides)


def runners(client) -> dict[str, dict]:
    body = client.get("/healthz").get_json()
    return {r["model"]: r for r in body.get("runners", [])}


def wait_status(engine, model_id: str, *statuses: str, timeout: float = 60) -> dict:
    record = engine.state.wait(model_id, lambda r: r["status"] in statuses, timeout)
    assert record is not None, f"{model_id} never became {statuses}: {engine.state.runner(model_id)}"
    return record


@pytest.mark.databases("sqlite", "postgresql")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_a_runner_killed_mid_reply_fails_that_reply_with_its_text_and_the_site_goes_on(
        make_app, make_live_server, db_backend, sig):
    app = runner_app(make_app)
    client = app.test_client()
    engine = app.extensions["bchat"].engines.engines[0]
    model_id = app.extensions["bchat"].engines.default_model
    before = wait_status(engine, model_id, "ready")
    server = make_live_server(app)
    visitor = server.session()
    ws = visitor.ws()
    ws.chat("a very long answer", options={"temperature": 0, "max_tokens": 4000})
    started, _ = ws.until("started")
    text = ""
    while len(text) < 20:  # the reply is under way, some of it already stored
        frame = ws.recv()
        assert frame["type"] == "token", f"the reply ended before the kill: {frame}"
        text = text[: frame["offset"]] + frame["text"]
    os.kill(before["pid"], sig)
    while True:  # tokens already in flight may still arrive; then the error frame
        frame = ws.recv()
        if frame["type"] == "token":
            text = text[: frame["offset"]] + frame["text"]
            continue
        break
    assert frame["type"] == "error", frame
    assert frame["code"] == "model_crashed"
    assert describe_exit(-sig) in frame["message"]
    status, stored = visitor.json("GET", f"/api/conversations/{started['conversation_id']}")
    reply = stored["messages"][-1]
    assert reply["id"] == started["message_id"]
    assert reply["status"] == "failed"
    assert reply["meta"]["error"]["code"] == "model_crashed"
    assert reply["content"] and text.startswith(reply["content"])

    # The supervisor restarts the runner; the next chat on the same socket completes.
    after = wait_status(engine, model_id, "ready")
    assert after["pid"] != before["pid"] and after["restarts"] == before["restarts"] + 1
    assert after["last_exit"] == describe_exit(-sig)
    ws.chat("hello again", conversation_id=started["conversation_id"],
            options={"temperature": 0, "max_tokens": 8})
    done, _ = ws.until("done", "error")
    assert done["type"] == "done", done
    health = runners(client)[model_id]
    assert health["restarts"] == 1 and health["pid"] == after["pid"]
    assert health["last_exit"] == describe_exit(-sig)
    ws.close()


def test_a_model_that_crashes_while_loading_ends_unavailable_and_the_other_model_answers(
        make_app, tiny_model, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "good.gguf").write_bytes(tiny_model.read_bytes())
    (models / "bad.gguf").write_bytes(tiny_model.read_bytes())
    # llama.cpp 0.3.36 refuses every corrupt header we could write with an error, not a crash,
    # so the runner of "bad" faults on itself (SIGSEGV) where it would load the model.
    monkeypatch.setenv("BCHAT_RUNNER_TEST_CRASH_ON_LOAD", "bad")
    app = runner_app(make_app, MODEL_PATH=str(models))
    engine = app.extensions["bchat"].engines.engines[0]
    record = wait_status(engine, "bad", "unavailable")
    assert record["load_crashes"] == LOAD_CRASH_LIMIT
    assert record["restarts"] == LOAD_CRASH_LIMIT - 1
    assert "SIGSEGV" in record["reason"] and "while loading" in record["reason"]
    wait_status(engine, "good", "ready")

    client = app.test_client()
    health = client.get("/healthz")
    assert health.status_code == 503
    problems = health.get_json()["problems"]
    assert [p["model"] for p in problems] == ["bad"] and problems[0]["problem"] == "unavailable"
    listed = {m["id"]: m for m in client.get("/api/models").get_json()["models"]}
    assert "while loading" in listed["bad"]["facts"]["unavailable"]

    def reply(model: str) -> list:
        return list(engine.stream(model, [{"role": "user", "content": "hi"}],
                                  GenerationOptions(max_tokens=4, temperature=0), threading.Event()))

    assert reply("good")[-1].finish_reason in ("stop", "length")
    with pytest.raises(Exception) as refused:
        reply("bad")
    assert refused.value.code == "model_unavailable"


def test_a_file_llama_cpp_refuses_is_unavailable_at_once_with_its_reason(make_app, tiny_model, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "good.gguf").write_bytes(tiny_model.read_bytes())
    broken = bytearray(tiny_model.read_bytes())
    broken[len(broken) // 2:] = b"\0" * (len(broken) - len(broken) // 2)  # header intact, no weights
    (models / "zeros.gguf").write_bytes(bytes(broken))
    key = b"llama.attention.head_count"
    data = bytearray(tiny_model.read_bytes())
    at = data.find(key) + len(key) + 4  # after the key: its type (u32), then the value
    data[at:at + 4] = (0).to_bytes(4, "little")  # zero heads: llama.cpp refuses the file
    (models / "headless.gguf").write_bytes(bytes(data))
    app = runner_app(make_app, MODEL_PATH=str(models))
    engine = app.extensions["bchat"].engines.engines[0]
    record = wait_status(engine, "headless", "unavailable")
    assert record["restarts"] == 0, "a file llama.cpp refuses is not retried"
    assert "could not be loaded" in record["reason"]
    assert wait_status(engine, "good", "ready")["status"] == "ready"


def test_a_supervisor_stops_its_runners_and_leaves_nothing(tiny_model):
    from webapp.catalogue import ModelCatalogue

    supervisor = RunnerSupervisor({"N_CTX": 512, "N_THREADS": 1,
                                   "PARALLEL": 1}, ModelCatalogue(tiny_model)).start()
    directory = supervisor.directory
    from webapp.engines.runner import RunnerState

    record = RunnerState(directory).wait("tiny-chat", lambda r: r["status"] == "ready", 60)
    assert record is not None
    supervisor.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(record["pid"], 0)
    assert not directory.exists()


def test_bchat_serve_survives_kill_9_of_its_model_and_healthz_says_so(tmp_path, tiny_model):
    """The README's `bchat serve`, as a real process: kill -9 its model, the site stays up."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCHAT_")}
    env.update(BCHAT_INSTANCE_PATH=str(tmp_path / "instance"), BCHAT_MODEL_PATH=str(tiny_model),
               BCHAT_N_THREADS="1", BCHAT_BROWSER_FORMAT="original")
    bchat = str(Path(sys.executable).with_name("bchat"))
    subprocess.run([bchat, "db", "upgrade"], env=env, check=True, capture_output=True)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([bchat, "serve", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc)
        visitor = HttpSession(f"http://127.0.0.1:{port}")
        ws = visitor.ws()
        ws.chat("hi", options={"temperature": 0, "max_tokens": 4})
        started, _ = ws.until("started")
        done, _ = ws.until("done", "error")
        assert done["type"] == "done", done
        status, health = visitor.json("GET", "/healthz")
        runner = health["runners"][0]
        assert runner["status"] == "ready" and runner["restarts"] == 0
        os.kill(runner["pid"], signal.SIGKILL)
        ws.chat("are you back?", conversation_id=started["conversation_id"],
                options={"temperature": 0, "max_tokens": 4})
        done, _ = ws.until("done", "error")
        assert done["type"] == "done", done  # waited for the restarted runner
        status, health = visitor.json("GET", "/healthz")
        assert status == 200 and proc.poll() is None
        runner = health["runners"][0]
        assert runner["restarts"] == 1 and runner["last_exit"] == describe_exit(-signal.SIGKILL)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    # The runner went with the server: no process is left holding the model.
    with pytest.raises(ProcessLookupError):
        os.kill(runner["pid"], 0)


@pytest.mark.slow
def test_the_bundled_model_decodes_on_this_cpu_in_a_runner(make_app, bundled_model):
    """Whatever CPU CI has (AVX-512, AMX or neither): the build setup made decodes SmolLM2."""
    app = runner_app(make_app, MODEL_PATH=str(bundled_model), BROWSER_FORMAT="original")
    engine = app.extensions["bchat"].engines.engines[0]
    model_id = app.extensions["bchat"].engines.default_model
    question = "What is the capital of France? Answer in one sentence."
    chunks = list(engine.stream(model_id, [{"role": "user", "content": question}],
                                GenerationOptions(max_tokens=24, temperature=0), threading.Event()))
    text = "".join(c.text for c in chunks if hasattr(c, "text"))
    assert chunks[-1].completion_tokens > 0 and "Paris" in text
    assert runners(app.test_client())[model_id]["restarts"] == 0


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, commands.get(child, "")))
            todo.append(child)
    return found


def test_gunicorn_workers_share_one_runner_per_model(tmp_path, tiny_model):
    """`gunicorn -c python:webapp.gunicorn_conf -w 2`: the model is loaded once, by one runner
    that both web workers use, and a runner killed mid-life does not restart a web worker."""
    from conftest import migrate

    url = f"sqlite:///{tmp_path / 'g.sqlite3'}"
    migrate(url)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCHAT_")}
    env.update(BCHAT_DATABASE_URL=url, BCHAT_MODEL_PATH=str(tiny_model), BCHAT_SECRET_KEY="g",
               BCHAT_N_THREADS="1", BCHAT_BROWSER_FORMAT="original",
               BCHAT_INSTANCE_PATH=str(tmp_path / "instance"))
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    proc = subprocess.Popen([gunicorn, "-c", "python:webapp.gunicorn_conf", "-k", "gthread",
                             "--threads", "8", "-w", "2", "--no-control-socket",
                             "-b", f"127.0.0.1:{port}", "webapp:create_app()"],
                            env=env, stdout=(tmp_path / "g.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc)
        visitor = HttpSession(f"http://127.0.0.1:{port}")
        ws = visitor.ws()
        ws.chat("hi", options={"temperature": 0, "max_tokens": 4})
        done, _ = ws.until("done", "error")
        assert done["type"] == "done", done
        tree = descendants(proc.pid)
        runner_procs = [pid for pid, cmd in tree if "model_runner runner" in cmd]
        supervisors = [pid for pid, cmd in tree if "model_runner supervise" in cmd]
        web_workers = [pid for pid, cmd in tree if "model_runner" not in cmd]
        assert len(runner_procs) == 1 and len(supervisors) == 1 and len(web_workers) == 2, tree
        # Each worker and the runner is a session (a CPU group under autogroup) of its own,
        # the runner's group niced (processes.own_scheduling_group).
        assert all(os.getsid(pid) == pid for pid in [*web_workers, *runner_procs])
        assert os.getsid(supervisors[0]) == proc.pid
        group = Path(f"/proc/{runner_procs[0]}/autogroup")
        if group.exists():  # a kernel with autogroup
            assert group.read_text().split()[-1] == "10", group.read_text()
        status, health = visitor.json("GET", "/healthz")
        assert health["runners"][0]["pid"] == runner_procs[0]
        os.kill(runner_procs[0], signal.SIGKILL)
        ws.chat("again", options={"temperature": 0, "max_tokens": 4})
        done, _ = ws.until("done", "error")
        assert done["type"] == "done", done
        assert sorted(pid for pid, cmd in descendants(proc.pid) if "model_runner" not in cmd) \
            == sorted(web_workers), "no web worker was restarted"
        assert visitor.json("GET", "/healthz")[1]["runners"][0]["restarts"] == 1
        ws.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert not [pid for pid, _cmd in tree if pid != proc.pid and _alive(pid)], "nothing left behind"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.browser
def test_the_page_says_at_once_that_the_model_stopped_and_retry_answers(make_app, make_live_server):
    from browser import chromium
    from playwright.sync_api import expect

    app = runner_app(make_app, MAX_TOKENS=4000)
    engine = app.extensions["bchat"].engines.engines[0]
    record = wait_status(engine, "tiny-chat", "ready")
    server = make_live_server(app)
    with chromium() as context:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        page.get_by_test_id("composer").fill("a long answer, please")
        page.get_by_test_id("composer").press("Enter")
        reply = page.locator('[data-testid="message"][data-role="assistant"]').first
        expect(reply).to_have_attribute("data-status", "streaming")
        expect(reply.locator(".body")).not_to_be_empty()
        os.kill(record["pid"], signal.SIGKILL)

        banner = page.get_by_test_id("error")
        expect(banner).to_be_visible(timeout=5_000)
        expect(page.get_by_test_id("error-text")).to_contain_text(
            "The model tiny-chat stopped: its process was killed by SIGKILL")
        expect(page.get_by_test_id("error-text")).to_contain_text("SIGKILL")
        expect(reply).to_have_attribute("data-status", "failed")
        assert reply.locator(".body").inner_text().strip(), "the partial reply is kept on screen"
        expect(page.get_by_test_id("connection")).to_have_text("connected")  # the socket is fine

        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("max-tokens").fill("8")
        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("retry").click()
        expect(banner).to_be_hidden()
        retried = page.locator('[data-testid="message"][data-role="assistant"]').last
        expect(retried).to_have_attribute("data-status", "complete", timeout=60_000)
        assert errors == []


def test_a_stop_reaches_the_runner_at_once_and_the_finish_keeps_the_counts(make_app):
    app = runner_app(make_app)
    engine = app.extensions["bchat"].engines.engines[0]
    wait_status(engine, "tiny-chat", "ready")
    cancel = threading.Event()
    chunks = engine.stream("tiny-chat", [{"role": "user", "content": "a long answer"}],
                           GenerationOptions(max_tokens=4000, temperature=0), cancel)
    seen = []
    for chunk in chunks:
        seen.append(chunk)
        if len(seen) == 5:
            cancel.set()
    finish = seen[-1]
    assert finish.finish_reason == "stopped"
    assert 5 <= finish.completion_tokens < 4000 and finish.prompt_tokens > 0
    # the runner goes on serving: the same model answers the next request
    again = list(engine.stream("tiny-chat", [{"role": "user", "content": "hi"}],
                               GenerationOptions(max_tokens=3, temperature=0), threading.Event()))
    assert again[-1].finish_reason in ("stop", "length")
    assert engine.state.runner("tiny-chat")["restarts"] == 0


def test_a_worker_freezes_what_it_loaded_so_collections_skip_it(make_app):
    """gunicorn's post_worker_init hook (webapp.gunicorn_conf) puts the loaded app out of the
    garbage collector's sight: a full collection no longer walks it in every worker."""
    import gc
    import types

    from webapp import gunicorn_conf

    app = make_app()
    before = signal.getsignal(signal.SIGTERM)
    gc.unfreeze()
    try:
        gunicorn_conf.post_worker_init(types.SimpleNamespace(wsgi=app))
        frozen = gc.get_freeze_count()
        assert frozen > 10_000, frozen  # the app, its modules and mappers
    finally:
        gc.unfreeze()
        signal.signal(signal.SIGTERM, before)
