"""OpenAI-compatible upstreams and the shared worker, against real servers on loopback:
`bchat worker` itself, llama-cpp-python's own server (a second, independent implementation),
and small HTTP servers written here for the failures a real model server rarely gives on cue
(429, 500, 401, a server that never answers)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import migrate
from helpers import HttpSession, free_port, text_of, wait_for_http

ROOT = Path(__file__).resolve().parent.parent
GREEDY = {"temperature": 0, "max_tokens": 12}


def start_worker(model: Path, port: int, **env_extra) -> subprocess.Popen:
    env = {**os.environ, "BCHAT_MODEL_PATH": str(model), "BCHAT_N_THREADS": "1", **env_extra}
    proc = subprocess.Popen(
        [sys.executable, "-m", "webapp.cli", "worker", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def worker(tiny_model):
    port = free_port()
    proc = start_worker(tiny_model, port)
    proc.url = f"http://127.0.0.1:{port}"
    yield proc
    stop(proc)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as response:
        return json.loads(response.read())


def wait_idle(url: str, timeout: float = 1.5) -> float:
    """Seconds until the worker has nothing running or waiting (fails after ``timeout``)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        activity = health(url)["activity"]
        if all(not a["running"] and not a["waiting"] for a in activity.values()):
            return time.perf_counter() - started
        time.sleep(0.02)
    raise AssertionError(f"the upstream was still generating after {timeout} s: {activity}")


def test_app_through_the_shared_worker(make_app, make_live_server, worker, tiny_model):
    server = make_live_server(make_app(WORKER_URL=worker.url))
    visitor = server.session()
    status, models = visitor.json("GET", "/api/models")
    (model,) = models["models"]
    assert model["id"] == "tiny-chat" and model["served_by"] == "worker"
    assert model["engines"] == ["server", "browser"], "the file is still served to browsers"
    assert model["facts"]["quantization"] == "F32"
    ws = visitor.ws()
    ws.chat("hello worker", options=GREEDY)
    done, frames = ws.until("done")
    reply = done["message"]
    assert reply["status"] == "complete" and reply["backend"] == "worker"
    assert reply["usage"]["completion_tokens"] == 12 and reply["usage"]["prompt_tokens"] > 5
    assert reply["content"] == text_of(frames) and reply["tokens_per_second"] > 0
    assert reply["finish_reason"] == "length"
    # the web app never loaded llama.cpp itself
    assert server.app.extensions["bchat"].engines.engines[0].name == "worker"
    ws.close()


def test_stop_and_disconnect_end_the_upstream_generation(make_app, make_live_server, worker):
    # No grace period: a closed tab stops the run at once (by default it goes on for 30 s).
    server = make_live_server(make_app(WORKER_URL=worker.url, RUN_GRACE_SECONDS=0))
    visitor = server.session()
    ws = visitor.ws()
    ws.chat("long", options={"temperature": 0, "max_tokens": 4000})
    ws.until("token")
    ws.send({"type": "stop"})
    done, _ = ws.until("done")
    assert done["message"]["status"] == "stopped"
    assert done["message"]["usage"]["completion_tokens"] < 4000
    wait_idle(worker.url, timeout=5)  # the worker stopped generating (4000 tokens take longer)

    ws.chat("long again", options={"temperature": 0, "max_tokens": 4000})
    ws.until("token")
    ws.conn.close()  # the visitor closes the tab
    wait_idle(worker.url, timeout=5)


def test_upstream_killed_mid_stream(make_app, make_live_server, tiny_model):
    port = free_port()
    proc = start_worker(tiny_model, port)
    try:
        server = make_live_server(make_app(WORKER_URL=f"http://127.0.0.1:{port}"))
        visitor = server.session()
        ws = visitor.ws()
        ws.chat("going to die", options={"temperature": 0, "max_tokens": 4000})
        started, _ = ws.until("started")
        ws.until("token")
        _kill_tree(proc)
        error, frames = ws.until("error")
        assert error["code"] == "upstream_disconnected", error
        stored = visitor.json("GET", f"/api/conversations/{started['conversation_id']}")[1]
        reply = stored["messages"][-1]
        assert reply["status"] == "failed" and reply["content"], "the partial reply is kept"
        assert reply["meta"]["error"]["code"] == "upstream_disconnected"
        # the same socket still works: the next request gets a clear "unreachable"
        ws.chat("anyone there?", started["conversation_id"], options=GREEDY)
        error, _ = ws.until("error")
        assert error["code"] in ("upstream_unreachable", "unknown_model")
        ws.send({"type": "ping"})
        assert ws.recv() == {"type": "pong"}
    finally:
        stop(proc)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's gunicorn master and its child, as an OOM killer would."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    for pid in [*pids, proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class FakeUpstream(BaseHTTPRequestHandler):
    """Answers like an OpenAI-compatible server, failing as the model name says."""

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path.endswith("/models"):
            names = ["rate-limited", "broken", "locked", "forbidden", "ctx", "sse-error", "half",
                     "vanished"]
            self._json(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
        else:
            self._json(404, {"error": {"message": "no"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        FakeUpstream.last_auth = self.headers.get("Authorization")
        model = json.loads(self.rfile.read(length))["model"]
        if model == "rate-limited":
            self._json(429, {"error": {"message": "slow down", "type": "rate_limit"}})
        elif model == "broken":
            self._json(500, {"error": {"message": "kaboom", "type": "server_error"}})
        elif model == "locked":
            self._json(401, {"error": {"message": "bad key", "type": "auth"}})
        elif model == "forbidden":
            self._json(403, {"error": {"message": "not for you", "type": "permission"}})
        elif model == "ctx":
            self._json(400, {"error": {"code": 400, "type": "exceed_context_size_error",
                                       "message": "the request exceeds the available context size"}})
        elif model in ("sse-error", "half"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"content": "partial "}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if model == "sse-error":
                self.wfile.write(b'data: {"error": {"message": "the GPU fell over"}}\n\n')
            self.wfile.flush()  # "half": the connection just ends, no finish, no [DONE]
        else:
            self._json(404, {"error": {"message": f"model {model} not found"}})


@pytest.fixture
def fake_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeUpstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("rate-limited", "upstream_rate_limited"),
        ("broken", "upstream_error"),
        ("locked", "upstream_auth"),
        ("forbidden", "upstream_auth"),
        ("vanished", "unknown_model"),  # listed, then gone: 404 on the request
        ("ctx", "context_too_long"),
        ("sse-error", "upstream_error"),
        ("half", "upstream_disconnected"),
    ],
)
def test_upstream_failures_become_clear_errors(make_app, make_live_server, fake_upstream,
                                               tmp_path, model, code):
    server = make_live_server(make_app(OPENAI_BASE_URL=fake_upstream, OPENAI_API_KEY="sk-secret"))
    visitor = server.session()
    ws = visitor.ws()
    ws.chat("hi", model=model, options=GREEDY)
    started, _ = ws.until("started")
    error, frames = ws.until("error")
    assert error["code"] == code, error
    assert "sk-secret" not in error["message"]
    reply = visitor.json("GET", f"/api/conversations/{started['conversation_id']}")[1]["messages"][-1]
    assert reply["status"] == "failed" and reply["meta"]["error"]["code"] == code
    if model in ("sse-error", "half"):
        assert reply["content"] == "partial " == text_of(frames)
    assert FakeUpstream.last_auth == "Bearer sk-secret"
    # the app and the socket are fine for the next request, on the embedded model
    ws.chat("still here?", options=GREEDY)
    done, _ = ws.until("done")
    assert done["message"]["status"] == "complete"
    ws.close()


def test_unreachable_and_silent_upstreams(make_app, make_live_server, tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does), never answers
    refused_port = free_port()
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text(f"""
[[upstream]]
name = "silent"
base_url = "http://127.0.0.1:{silent.getsockname()[1]}/v1"
models = ["sleepy"]
read_timeout = 1

[[upstream]]
name = "gone"
base_url = "http://127.0.0.1:{refused_port}/v1"
api_key_env = "BCHAT_TEST_KEY"
models = ["ghost"]
""")
    os.environ["BCHAT_TEST_KEY"] = "sk-from-env"
    try:
        server = make_live_server(make_app(UPSTREAMS_FILE=str(upstreams)))
        visitor = server.session()
        listed = {m["id"]: m["served_by"] for m in visitor.json("GET", "/api/models")[1]["models"]}
        assert listed == {"tiny-chat": "llamacpp", "sleepy": "silent", "ghost": "gone"}
        ws = visitor.ws()
        began = time.perf_counter()
        ws.chat("hello?", model="sleepy", options=GREEDY)
        error, _ = ws.until("error")
        # The file's read_timeout (1 s, with the client's retries) was used, not the default
        # 600 s: a bound far from both, as a busy machine may take seconds more (once: > 5 s).
        assert error["code"] == "upstream_timeout" and time.perf_counter() - began < 60
        ws.chat("hello?", model="ghost", options=GREEDY)
        error, _ = ws.until("error")
        assert error["code"] == "upstream_unreachable" and "cannot be reached" in error["message"]
        ws.chat("and you?", options=GREEDY)
        assert ws.until("done")[0]["message"]["status"] == "complete"
        ws.close()
    finally:
        del os.environ["BCHAT_TEST_KEY"]
        silent.close()


def test_llama_cpp_server_as_an_independent_upstream(make_app, make_live_server, tiny_model):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_model), "--port", str(port),
         "--n_ctx", "4096", "--n_threads", "2", "--interrupt_requests", "False"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/models", proc)
        server = make_live_server(make_app(OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
                                           OPENAI_MODELS=["llama-server-tiny"],
                                           MODEL_PATH=str(tiny_model.parent / "absent")))
        visitor = server.session()
        ws = visitor.ws()
        ws.chat("hello llama_cpp.server", model="llama-server-tiny", options=GREEDY)
        done, frames = ws.until("done")
        reply = done["message"]
        assert reply["status"] == "complete" and reply["backend"] == "127.0.0.1"
        assert reply["content"] == text_of(frames) and reply["content"]
        assert reply["usage"]["completion_tokens"] == 12
        # stop closes the upstream request; the next one starts at once
        ws.chat("long", model="llama-server-tiny", options={"temperature": 0, "max_tokens": 3000})
        ws.until("token")
        ws.send({"type": "stop"})
        done, _ = ws.until("done")
        assert done["message"]["status"] == "stopped"
        began = time.perf_counter()
        ws.chat("next", model="llama-server-tiny", options=GREEDY)
        done, _ = ws.until("done")
        assert done["message"]["status"] == "complete"
        assert time.perf_counter() - began < 5, "the stopped generation did not keep the server busy"
        ws.close()
    finally:
        stop(proc)


def test_several_gunicorn_workers_share_one_model_process(worker, tmp_path, tiny_model):
    """`gunicorn -w 2` web workers, one `bchat worker`: the model is loaded once, in the worker."""
    url = f"sqlite:///{tmp_path / 'g.sqlite3'}"
    migrate(url)
    port = free_port()
    env = {**os.environ, "BCHAT_DATABASE_URL": url, "BCHAT_MODEL_PATH": str(tiny_model),
           "BCHAT_SECRET_KEY": "shared", "BCHAT_WORKER_URL": worker.url}
    web = subprocess.Popen(
        [str(ROOT / ".venv/bin/gunicorn"), "-k", "gthread", "--threads", "8", "-w", "2",
         "--no-control-socket", "-b", f"127.0.0.1:{port}", "webapp:create_app()"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", web)
        results: list[dict] = []

        def chat(i: int) -> None:
            visitor = HttpSession(f"http://127.0.0.1:{port}")
            ws = visitor.ws()
            ws.chat(f"visitor {i}", options={"temperature": 0, "max_tokens": 200})
            results.append(ws.until("done")[0]["message"])
            ws.close()

        threads = [threading.Thread(target=chat, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(results) == 6
        assert all(r["status"] == "complete" and r["usage"]["completion_tokens"] == 200 for r in results)
        assert health(worker.url)["loaded"] == ["tiny-chat"]
        web_pids = [int(p) for p in Path(f"/proc/{web.pid}/task/{web.pid}/children").read_text().split()]
        assert len(web_pids) == 2
        for pid in web_pids:
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "libllama" not in maps, "a web worker loaded llama.cpp itself"
        worker_children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
        assert any("libllama" in Path(f"/proc/{pid}/maps").read_text() for pid in worker_children)
    finally:
        stop(web)


def test_worker_reports_context_too_long_and_unknown_models(make_app, make_live_server, tiny_model):
    port = free_port()
    proc = start_worker(tiny_model, port, BCHAT_N_CTX="128")
    try:
        server = make_live_server(make_app(WORKER_URL=f"http://127.0.0.1:{port}"))
        visitor = server.session()
        ws = visitor.ws()
        ws.chat("water " * 300, options=GREEDY)
        error, _ = ws.until("error")
        assert error["code"] == "context_too_long" and "128" in error["message"]
        ws.chat("short", options=GREEDY)
        assert ws.until("done")[0]["message"]["status"] == "complete"
        ws.close()
        # straight at the worker: OpenAI-style errors
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
            data=json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 404
        assert json.loads(info.value.read())["error"]["code"] == "model_not_found"
    finally:
        stop(proc)
