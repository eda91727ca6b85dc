"""`bchat models pull/remove`: a real loopback HTTP server (Range, redirects, a dropped
connection, the hub's X-Linked-Etag) serves the tiny GGUF; the pulled model must then be
listed by an app pointed at the folder."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from webapp.catalogue import read_model_file
from webapp.model_pull import PullError, parse_source, pull, remove

BCHAT = [sys.executable, "-m", "webapp.cli"]


class FakeHub:
    """Files under /files/NAME (Range supported) and, hub-style, /USER/REPO/resolve/REV/NAME
    answering with X-Linked-Etag/X-Linked-Size and a redirect to /files/NAME."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.linked_etag: dict[str, str] = {}
        self.drop_next: set[str] = set()  # names whose next GET breaks off half way
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                match = re.fullmatch(r"/(\w+)/(\w+)/resolve/(\w+)/(.+)", self.path)
                if match:
                    name = match.group(4)
                    if name not in hub.files:
                        return self._plain(404)
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{hub.port}/files/{name}")
                    self.send_header("X-Linked-Size", str(len(hub.files[name])))
                    if name in hub.linked_etag:
                        self.send_header("X-Linked-Etag", f'"{hub.linked_etag[name]}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                name = self.path.removeprefix("/files/")
                data = hub.files.get(name)
                if data is None:
                    return self._plain(404)
                start = 0
                if self.headers.get("Range"):
                    start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1))
                    if start >= len(data):
                        return self._plain(416)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return None
                if name in hub.drop_next:
                    hub.drop_next.discard(name)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # hang up with the rest unsent
                    return None
                self.wfile.write(data[start:])
                return None

            def _plain(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of /files/NAME, in order."""
        return [rng for method, path, rng in self.requests if method == "GET" and path == f"/files/{name}"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


@pytest.fixture
def tiny_bytes(tiny_model) -> bytes:
    return tiny_model.read_bytes()


def test_hub_pull_survives_a_dropped_connection_verifies_and_is_served(
    hub, tiny_bytes, tmp_path, make_app
):
    folder = tmp_path / "models"
    hub.files["tiny-chat.gguf"] = tiny_bytes
    hub.linked_etag["tiny-chat.gguf"] = hashlib.sha256(tiny_bytes).hexdigest()
    hub.drop_next.add("tiny-chat.gguf")
    progress = io.StringIO()

    result = pull("hf://someone/tiny/tiny-chat.gguf", folder, retry_wait=0, progress_stream=progress)

    half = len(tiny_bytes) // 2
    assert hub.gets("tiny-chat.gguf") == [None, f"bytes={half}-"], "resumed where it broke off"
    assert ("HEAD", "/someone/tiny/resolve/main/tiny-chat.gguf", None) in hub.requests
    assert result.checked_against == "hub" and result.sha256 == hub.linked_etag["tiny-chat.gguf"]
    assert (folder / "tiny-chat.gguf").read_bytes() == tiny_bytes
    assert (folder / "tiny-chat.gguf.sha256").read_text() == f"{result.sha256}  tiny-chat.gguf\n"
    assert sorted(p.name for p in folder.iterdir()) == ["tiny-chat.gguf", "tiny-chat.gguf.sha256"]
    assert "resuming" in progress.getvalue() and "MiB" in progress.getvalue()

    client = make_app(MODEL_PATH=str(folder)).test_client()
    (model,) = client.get("/api/models").get_json()["models"]
    assert model["id"] == "tiny-chat"
    facts = model["facts"]
    assert facts["file_size"] == len(tiny_bytes)
    assert facts["fits_server"]["fits"] is True
    assert facts["fits_server"]["memory_needed"] > len(tiny_bytes)


def test_an_interrupted_pull_resumes_in_a_later_run(hub, tiny_bytes, tmp_path):
    folder = tmp_path / "models"
    hub.files["m.gguf"] = tiny_bytes
    hub.drop_next.add("m.gguf")
    with pytest.raises(PullError, match="run the same command again to resume"):
        pull(f"{hub.url}/files/m.gguf", folder, retries=0, progress_stream=io.StringIO())
    part = folder / "m.gguf.part"
    assert part.stat().st_size == len(tiny_bytes) // 2
    assert not (folder / "m.gguf").exists(), "no .gguf name before it is complete"

    result = pull(f"{hub.url}/files/m.gguf", folder, progress_stream=io.StringIO())
    assert hub.gets("m.gguf") == [None, f"bytes={len(tiny_bytes) // 2}-"]
    assert result.checked_against is None, "a plain URL publishes no checksum: it is recorded"
    assert result.sha256 == hashlib.sha256(tiny_bytes).hexdigest()
    assert (folder / "m.gguf").read_bytes() == tiny_bytes and not part.exists()
    assert (folder / "m.gguf.sha256").read_text().split() == [result.sha256, "m.gguf"]


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(hub, tiny_bytes, tmp_path):
    folder = tmp_path / "models"
    hub.files["tiny.gguf"] = tiny_bytes
    hub.linked_etag["tiny.gguf"] = "0" * 64
    with pytest.raises(PullError, match="checksum mismatch.*expected sha256 0{64} \\(hub\\)"):
        pull("hf://someone/tiny/tiny.gguf", folder, progress_stream=io.StringIO())
    assert list(folder.iterdir()) == []

    with pytest.raises(PullError, match="checksum mismatch.*\\(given\\)"):
        pull(f"{hub.url}/files/tiny.gguf", folder, sha256="ab" * 32, progress_stream=io.StringIO())
    assert list(folder.iterdir()) == []
    with pytest.raises(PullError, match="64 hex digits"):
        pull(f"{hub.url}/files/tiny.gguf", folder, sha256="abc")


def test_not_a_gguf_is_refused_early(hub, tmp_path):
    folder = tmp_path / "models"
    hub.files["page.gguf"] = b"<!doctype html><title>Sign in</title>" + b"x" * 3_000_000
    with pytest.raises(PullError, match="is not a GGUF file"):
        pull(f"{hub.url}/files/page.gguf", folder, progress_stream=io.StringIO())
    assert list(folder.iterdir()) == []

    # GGUF magic but a broken header: refused by the parser, not only the magic check
    hub.files["broken.gguf"] = b"GGUF" + b"\xff" * 64
    with pytest.raises(PullError, match="not a readable GGUF"):
        pull(f"{hub.url}/files/broken.gguf", folder, progress_stream=io.StringIO())
    assert list(folder.iterdir()) == []


def test_missing_files_and_existing_destinations_are_clear_errors(hub, tiny_model, tmp_path):
    folder = tmp_path / "models"
    with pytest.raises(PullError, match="HTTP 404"):
        pull("hf://someone/tiny/nothing.gguf", folder)
    with pytest.raises(PullError, match="HTTP 404"):
        pull(f"{hub.url}/files/nothing.gguf", folder)
    folder.mkdir(exist_ok=True)
    (folder / "tiny-chat.gguf").write_bytes(tiny_model.read_bytes())
    with pytest.raises(PullError, match="already exists.*bchat models remove tiny-chat.gguf"):
        pull(f"{hub.url}/files/tiny-chat.gguf", folder)


def test_sources_and_names(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    source = parse_source("hf://bartowski/Some-GGUF@v1.0/sub/dir/model-Q4_K_M.gguf")
    assert source.url == "https://huggingface.co/bartowski/Some-GGUF/resolve/v1.0/sub/dir/model-Q4_K_M.gguf"
    assert source.filename == "model-Q4_K_M.gguf" and source.from_hub
    assert parse_source("hf://a/b/c.gguf").url == "https://huggingface.co/a/b/resolve/main/c.gguf"
    assert parse_source("https://x.org/m%20q.gguf?download=1").filename == "m q.gguf"
    for bad in ("hf://a/b", "hf://a//c.gguf", "ftp://x/y.gguf", "model.gguf", "https://x.org/model.bin"):
        with pytest.raises(PullError):
            parse_source(bad)


def test_remove_deletes_the_model_and_its_sidecar_only(tmp_path, tiny_model):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "a.gguf.sha256").write_text("x  a.gguf\n")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    assert sorted(p.name for p in remove("a", tmp_path)) == ["a.gguf", "a.gguf.sha256"]
    assert [p.name for p in tmp_path.iterdir()] == ["b.gguf"]
    with pytest.raises(PullError, match="no model a.gguf"):
        remove("a.gguf", tmp_path)
    for bad in ("../b", "sub/b.gguf", ".hidden"):
        with pytest.raises(PullError, match="plain file name"):
            remove(bad, tmp_path)
    assert (tmp_path / "b.gguf").exists()


def test_memory_facts_come_from_the_header(tiny_model):
    model = read_model_file(tiny_model)
    # tiny model: 2 layers, dim 64, as many KV heads as heads: K and V of 64 f16 values per layer
    assert model.n_layers == 2 and model.kv_bytes_per_token == 2 * 64 * 2 * 2
    assert model.memory_needed(1000) == int(model.file_size * 1.2) + 1000 * 512
    assert model.memory_needed(10**6) == model.memory_needed(model.context_length), "capped"
    fit = model.facts(n_ctx=1024, parallel=2)["fits_server"]
    meminfo = Path("/proc/meminfo").read_text()
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    assert abs(fit["mem_available"] - available) < 512 * 2**20
    assert fit == {**fit, "fits": True, "n_ctx": 1024, "parallel": 2,
                   "memory_needed": int(model.file_size * 1.2) + 2 * 1024 * 512}


def test_the_cli_pulls_lists_and_removes(hub, tiny_bytes, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    hub.files["tiny-chat.gguf"] = tiny_bytes
    env = {**os.environ, "BCHAT_MODEL_PATH": str(folder), "BCHAT_DATABASE_URL": "sqlite://"}

    def bchat(*args):
        return subprocess.run(BCHAT + list(args), env=env, capture_output=True, text=True, timeout=120)

    out = bchat("models", "pull", f"{hub.url}/files/tiny-chat.gguf")
    assert out.returncode == 0, out.stderr
    assert "MiB" in out.stderr and "sha256" in out.stdout and "to serve it" not in out.stderr
    for listing in (bchat("models"), bchat("models", "list")):
        assert listing.returncode == 0 and listing.stdout.splitlines()[1].startswith("tiny-chat ")
    again = bchat("models", "pull", f"{hub.url}/files/tiny-chat.gguf")
    assert again.returncode == 1 and "already exists" in again.stderr
    out = bchat("models", "remove", "tiny-chat")
    assert out.returncode == 0 and "tiny-chat.gguf.sha256" in out.stdout
    assert list(folder.iterdir()) == []
    out = bchat("models", "remove", "tiny-chat")
    assert out.returncode == 1 and "no model tiny-chat.gguf" in out.stderr


@pytest.mark.parametrize("parallel, fits", [(2, True), (2**20, False)], ids=["fits", "too-big"])
def test_the_page_the_engines_and_doctor_judge_the_fit_alike(make_app, parallel, fits):
    """For the context and chats the server is configured with, read from a real GGUF header:
    2**20 chats of 2,048 tokens of the tiny model need ~1 TiB of KV cache, more than any machine
    this runs on has free; 2 chats need a few MiB."""
    from webapp.doctor import check_models

    app = make_app(N_CTX=2048, PARALLEL=parallel)
    (listed,) = app.test_client().get("/api/models").get_json()["models"]  # what the page reads
    fit = listed["facts"]["fits_server"]
    assert fit["fits"] is fits and fit["n_ctx"] == 2048 and fit["parallel"] == parallel
    assert fit["memory_needed"] > parallel * 2048 * 512, "the KV cache of every chat is counted"
    (info,) = app.extensions["bchat"].engines.models()
    same = {k: v for k, v in fit.items() if k != "mem_available"}  # free memory moves
    assert {k: v for k, v in info.facts["fits_server"].items() if k != "mem_available"} == same
    (check,) = [c for c in check_models(app.config) if c.detail.startswith("tiny-chat:")]
    needs = re.search(r"needs ~([\d,]+) MiB for (\d+) x (\d+) tokens", check.detail)
    assert int(needs[1].replace(",", "")) == round(fit["memory_needed"] / 2**20)
    assert (int(needs[2]), int(needs[3])) == (parallel, 2048)
    assert check.status == ("ok" if fits else "FAIL")
