"""Compare (one prompt, several models, sibling replies streaming at once) and the benchmark:
the fixed prompt set on the server's models, browsers' runs stored beside them, `bchat bench`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def test_compare_streams_sibling_replies_and_the_pick_becomes_the_branch(make_app, make_live_server,
                                                                         tmp_path, tiny_model):
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-chat.gguf").write_bytes(tiny_model.read_bytes())
    write_tiny_model(models / "tiny-other.gguf", seed=99)
    server = make_live_server(make_app(MODEL_PATH=str(models)))
    visitor = server.session()
    ws = visitor.ws()
    ws.send({"type": "compare", "request_id": "c1", "content": "which is better?",
             "targets": [{"model": "tiny-chat"}, {"model": "tiny-other"}],
             "options": {"temperature": 0, "max_tokens": 24}})
    started, _ = ws.until("started")
    assert started["kind"] == "compare" and started["request_id"] == "c1"
    ids = started["message_ids"]
    assert len(ids) == 2 and [r["model"] for r in started["replies"]] == ["tiny-chat", "tiny-other"]
    done: dict[str, dict] = {}
    seen_tokens: set[str] = set()
    while len(done) < 2:
        frame = ws.recv()
        if frame["type"] == "token":
            seen_tokens.add(frame["message_id"])
        if frame["type"] == "done":
            done[frame["message_id"]] = frame["message"]
    assert seen_tokens == set(ids), "both replies streamed over the one socket"
    replies = [done[i] for i in ids]
    assert replies[0]["parent_id"] == replies[1]["parent_id"] == started["user_message"]["id"]
    assert replies[0]["content"] != replies[1]["content"]
    assert all(r["status"] == "complete" and r["tokens_per_second"] > 0 for r in replies)
    assert all(r["meta"]["prompt_ms"] > 0 for r in replies)
    # The user picks the second: it becomes the current branch, the first stays a sibling.
    cid = started["conversation_id"]
    status, conv = visitor.json("PATCH", f"/api/conversations/{cid}", {"current_message_id": ids[1]})
    assert status == 200 and conv["current_message_id"] == ids[1]
    assert visitor.json("GET", f"/api/conversations/{cid}")[1]["current_message_id"] == ids[1]
    for bad in ([], [{"model": 5}], [{"model": "tiny-chat"}] * 5):
        ws.send({"type": "compare", "content": "x", "targets": bad})
        error, _ = ws.until("error")
        assert error["code"] == "bad_targets"
    ws.close()


def test_server_benchmark_is_stored_with_the_engines_figures(live_server):
    visitor = live_server.session()
    visitor.visit()
    status, record = visitor.json("POST", "/api/benchmarks/server", {"tokens": 8})
    assert status == 201
    assert record["engine"] == "server" and record["backend"] == "llamacpp"
    assert record["model"] == "tiny-chat" and record["device"]["cores"] >= 1
    by_prompt = {r["prompt"]: r for r in record["results"]}
    assert set(by_prompt) == {"short", "long"}
    assert by_prompt["long"]["prompt_tokens"] > by_prompt["short"]["prompt_tokens"] > 0
    for result in record["results"]:
        assert result["completion_tokens"] == 8
        assert result["decode_tps"] > 0 and result["prompt_tps"] > 0 and result["ttft_ms"] > 0
    # A browser's run of the same prompt set sits beside it, with coarse device facts only.
    status, browser = visitor.json("POST", "/api/benchmarks", {
        "backend": "wasm-mt", "model": "tiny-chat",
        "device": {"cores": 8, "device_memory": 8, "gpu": "Example GPU", "browser": "Chromium",
                   "os": "Linux", "serial": "ABC-123"},
        "results": [{"prompt": "short", "prompt_tokens": 20, "prompt_ms": 100.0, "prompt_tps": 200.0,
                     "decode_tps": 15.5, "completion_tokens": 64, "ttft_ms": 150.0}],
    })
    assert status == 201 and "serial" not in browser["device"]
    status, listing = visitor.json("GET", "/api/benchmarks")
    assert [b["engine"] for b in listing["benchmarks"][:2]] == ["browser", "server"]
    assert listing["benchmarks"][0]["mine"] is True
    assert [p["name"] for p in listing["prompts"]] == ["short", "long"]
    other = live_server.session()
    other.visit()
    assert other.json("GET", "/api/benchmarks")[1]["benchmarks"][0]["mine"] is False
    for bad in ({"backend": "gpu", "model": "m", "results": [{"prompt": "short"}]},
                {"backend": "wasm-st", "model": "m", "results": [{"prompt": "short", "decode_tps": -1}]},
                {"backend": "wasm-st", "model": "m", "results": [{"prompt": "poem"}]}):
        status, body = visitor.json("POST", "/api/benchmarks", bad)
        assert status == 400 and body["error"]["code"] == "bad_benchmark"


def test_bchat_bench_prints_the_servers_row(tmp_path, tiny_model):
    from conftest import migrate

    url = f"sqlite:///{tmp_path / 'bench.sqlite3'}"
    migrate(url)
    env = {**os.environ, "BCHAT_DATABASE_URL": url, "BCHAT_MODEL_PATH": str(tiny_model),
           "BCHAT_SECRET_KEY": "x", "BCHAT_N_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "webapp.cli", "bench", "--tokens", "8"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["engine", "backend", "model"]
    rows = [line.split() for line in lines[1:]]
    assert [len(row) for row in rows] == [12, 12], out.stdout  # the table and nothing else
    assert [row[5] for row in rows] == ["short", "long"]
    assert all(row[0] == "server" and row[2] == "tiny-chat" for row in rows)
    import sqlite3

    with sqlite3.connect(tmp_path / "bench.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM benchmark").fetchone() == (1,)


def test_a_server_benchmark_is_cancelled_by_its_owner_only_and_nothing_is_stored(live_server,
                                                                                 monkeypatch):
    """DELETE /api/benchmarks/server stops the caller's run before its next prompt (the one
    under way gets its engine's cancel): the POST answers 409 cancelled and stores nothing.
    Another visitor's DELETE is a 404 and stops nothing. The real engine runs each prompt;
    the wrapper only holds the first prompt's end until the cancels are sent."""
    import threading

    from webapp import benchmarks

    real = benchmarks.run_prompt
    prompts: list[str] = []
    first_done, cancels_sent = threading.Event(), threading.Event()

    def held(engine, model, prompt, tokens, cancel=None):
        result = real(engine, model, prompt, tokens, cancel)
        prompts.append(prompt["name"])
        first_done.set()
        assert cancels_sent.wait(60)
        return result

    monkeypatch.setattr(benchmarks, "run_prompt", held)
    owner, other = live_server.session(), live_server.session()
    owner.visit()
    other.visit()
    answer: dict = {}
    post = threading.Thread(target=lambda: answer.update(
        zip(("status", "body"), owner.json("POST", "/api/benchmarks/server", {"tokens": 8}),
            strict=True)))
    post.start()
    assert first_done.wait(60)
    assert other.json("DELETE", "/api/benchmarks/server")[0] == 404  # not theirs to stop
    status, _ = owner.json("DELETE", "/api/benchmarks/server")
    assert status == 204
    cancels_sent.set()
    post.join(60)
    assert answer["status"] == 409 and answer["body"]["error"]["code"] == "cancelled"
    assert prompts == ["short"]  # the long prompt never ran
    assert owner.json("GET", "/api/benchmarks")[1]["benchmarks"] == []
    # nothing running now: a DELETE finds nothing, and a new run goes through
    assert owner.json("DELETE", "/api/benchmarks/server")[0] == 404
    cancels_sent.set()
    status, record = owner.json("POST", "/api/benchmarks/server", {"tokens": 8})
    assert status == 201 and [r["prompt"] for r in record["results"]] == ["short", "long"]


def test_a_cancel_sent_before_its_run_begins_still_stops_it(live_server):
    """The page names its run: a Cancel that reaches the server before the run's POST does
    (a quick click) stops that run when it comes, and no other."""
    owner = live_server.session()
    owner.visit()
    assert owner.json("DELETE", "/api/benchmarks/server?run=r1")[0] == 204
    status, body = owner.json("POST", "/api/benchmarks/server", {"tokens": 8, "run": "r1"})
    assert status == 409 and body["error"]["code"] == "cancelled"
    status, record = owner.json("POST", "/api/benchmarks/server", {"tokens": 8, "run": "r2"})
    assert status == 201 and len(record["results"]) == 2
    assert owner.json("POST", "/api/benchmarks/server", {"tokens": 8, "run": ""})[0] == 400
