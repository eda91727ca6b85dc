"""The browser engine: the real vendored wllama runs the real bundled SmolLM2 in chromium.

One chromium profile for the whole module, like one visitor's browser: the first test
downloads the model into the browser's storage (OPFS), later ones must not download it again.
Chromium runs with --enable-unsafe-webgpu, so the page finds a WebGPU adapter (SwiftShader)
that llama.cpp cannot use (no shader-f16): detection and fallback are tested for real.
"""

from __future__ import annotations

import re
import threading

import pytest
from browser import chromium
from conftest import LiveServer, migrate
from playwright.sync_api import expect

from webapp import create_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPLY_TIMEOUT = 180_000  # ms; WASM on 2 cores evaluates prompts at ~10-20 tokens/s


class ModelRequestCounter:
    """WSGI middleware: counts requests for model files, by method, and keeps their paths."""

    def __init__(self, app) -> None:
        self.app = app
        self.counts: dict[str, int] = {}
        self.paths: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"].startswith("/models/"):
            with self.lock:
                method = environ["REQUEST_METHOD"]
                ranged = "HTTP_RANGE" in environ
                key = f"{method}{' range' if ranged else ''}"
                self.counts[key] = self.counts.get(key, 0) + 1
                self.paths.append(environ["PATH_INFO"])
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundled_model):
    tmp = tmp_path_factory.mktemp("browser-engine")
    url = f"sqlite:///{tmp / 'b.sqlite3'}"
    migrate(url)
    app = create_app({"DATABASE_URL": url, "MODEL_PATH": str(bundled_model),
                      "SECRET_KEY": "browser-engine", "N_THREADS": 1})
    counter = ModelRequestCounter(app.wsgi_app)
    app.wsgi_app = counter
    live = LiveServer(app)
    live.counter = counter
    yield live
    live.stop()
    app.extensions["bchat"].close()


@pytest.fixture(scope="module")
def browser():
    with chromium(["--enable-unsafe-webgpu"]) as context:
        yield context


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    yield page
    page.close()
    assert errors == []


def settings(page, *, max_tokens: int, temperature: float = 0.0) -> None:
    page.get_by_test_id("settings").locator("summary").click()
    page.get_by_test_id("max-tokens").fill(str(max_tokens))
    page.get_by_test_id("temperature").fill(str(temperature))
    page.get_by_test_id("settings").locator("summary").click()


def send(page, text: str):
    before = page.locator('[data-testid="message"][data-role="assistant"]').count()
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("composer").press("Enter")
    return page.locator('[data-testid="message"][data-role="assistant"]').nth(before)


def stored_messages(page, server):
    conversation_id = page.url.rsplit("/c/", 1)[1]
    return page.evaluate(
        "async id => (await (await fetch(`/api/conversations/${id}`)).json()).messages",
        conversation_id,
    )


def use_browser_engine(page, backend: str = "auto") -> None:
    """Pick the browser engine; when the model is not in this profile's storage yet (a test run
    on its own), download it through the Download button and its size dialog."""
    page.get_by_test_id("engine-select").select_option("browser")
    page.get_by_test_id("backend-select").select_option(backend)
    page.wait_for_function("() => document.querySelector('[data-testid=browser-status]').dataset.stored")
    if page.get_by_test_id("model-download").is_visible():
        page.get_by_test_id("model-download").click()
        page.get_by_test_id("download-dialog-confirm").click()


def record_status(page) -> None:
    """Record every status line and progress value the page shows from now on."""
    page.evaluate("""() => {
        window.statusLog = [];
        const text = document.querySelector('[data-testid="browser-status-text"]');
        const bar = document.querySelector('[data-testid="model-progress"]');
        new MutationObserver(() => window.statusLog.push([text.textContent, bar.value]))
            .observe(text, {childList: true, characterData: true, subtree: true});
    }""")


def test_the_served_format_downloads_when_asked_not_when_the_engine_is_picked(page, server):
    assert page.evaluate("crossOriginIsolated") is True
    listing = page.evaluate("fetch('/api/models').then((r) => r.json())")
    (model,) = listing["models"]
    # The page runs the format bench/browser_speed.py measured fastest in WASM (the default of
    # BCHAT_BROWSER_FORMAT), derived from the shipped Q4_1; the server keeps the Q4_1.
    assert model["browser"]["format"] == "Q8_0" and "fastest in the page" in model["browser"]["reason"]
    assert model["server"]["format"] == "Q4_1" == model["facts"]["quantization"]
    assert model["browser"]["url"].endswith("/SmolLM2-135M-Instruct.Q4_1.Q8_0.gguf")
    record_status(page)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url) if "/models/" in request.url else None)
    # Picking the engine moves no model bytes: the status offers a Download with the size.
    page.get_by_test_id("engine-select").select_option("browser")
    download = page.get_by_test_id("model-download")
    expect(download).to_have_text(re.compile(r"Download 13\d(\.\d)? MiB"))
    assert requested == [] and server.counter.counts.get("GET", 0) == 0
    # Over LARGE_DOWNLOAD_BYTES (100 MiB): the page asks first, in its own dialog.
    download.click()
    expect(page.get_by_test_id("download-dialog")).to_contain_text(re.compile(r"13\d(\.\d)? MiB"))
    assert requested == []
    page.get_by_test_id("download-dialog-confirm").click()
    status = page.get_by_test_id("browser-status-text")
    expect(status).to_contain_text("runs in this browser", timeout=REPLY_TIMEOUT)
    # ready: a one-line chip
    expect(page.get_by_test_id("browser-status")).to_have_attribute("data-collapsed", "")
    assert page.get_by_test_id("browser-status").bounding_box()["height"] < 40
    assert set(requested) == {server.url + model["browser"]["url"]}, requested  # a HEAD, then the GET
    log = page.evaluate("window.statusLog")
    assert any("(Q8_0, 135M parameters) is downloaded once" in line for line, _ in log), log
    assert any(line.startswith("Preparing") and "can store" in line for line, _ in log), log
    downloading = [(line, value) for line, value in log if line.startswith("Downloading")]
    assert downloading, log
    assert "MiB/s" in downloading[-1][0] and "%" in downloading[-1][0]
    assert downloading[-1][1] == 1, "the bar reaches the end"
    assert server.counter.counts.get("GET", 0) == 1, server.counter.counts
    assert [p for p in server.counter.paths if p.endswith(".gguf")][-1] == model["browser"]["url"]
    assert page.locator('[data-role="assistant"]').count() == 0, "nothing was sent"


def test_wasm_multi_thread_reply_streams_and_is_stored_with_provenance(page, server):
    use_browser_engine(page)
    settings(page, max_tokens=24)
    reply = send(page, "Say hello in one short sentence.")
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    status = page.get_by_test_id("browser-status-text").inner_text()
    assert "wasm-mt" in status and "2 threads" in status
    assert "shader-f16" in status, "the SwiftShader adapter is found and refused, and the UI says so"
    expect(reply.locator(".meta")).to_contain_text("browser (wasm-mt)")

    user, assistant = stored_messages(page, server)
    assert user["role"] == "user" and user["content"] == "Say hello in one short sentence."
    assert assistant["engine"] == "browser" and assistant["backend"] == "wasm-mt"
    assert assistant["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert assistant["status"] == "complete" and assistant["content"].strip()
    assert 0 < assistant["usage"]["completion_tokens"] <= 24
    assert assistant["tokens_per_second"] > 0
    assert assistant["meta"]["threads"] == 2
    # Prompt facts as server replies record them, and consistent with each other: nothing was
    # cached in a fresh conversation, the whole templated prompt was evaluated.
    meta, prompt_tokens = assistant["meta"], assistant["usage"]["prompt_tokens"]
    assert prompt_tokens > 5
    assert meta["prompt_evaluated"] + meta["prompt_cached"] == prompt_tokens
    assert meta["prompt_evaluated"] >= prompt_tokens - 1, meta  # at most the BOS was reused
    assert 0 < meta["prompt_ms"] < REPLY_TIMEOUT
    assert meta["prompt_per_second"] == pytest.approx(meta["prompt_evaluated"] / meta["prompt_ms"] * 1000,
                                                      rel=0.05)
    assert server.counter.counts.get("GET", 0) == 1, "loaded from the browser's storage, no second GET"


def test_history_is_read_with_progress_before_the_first_browser_turn(page, server):
    """A conversation written elsewhere, opened with the browser engine picked: the page reads
    its history into the model's cache at once, saying how far it got, and the first turn waits
    for that reading instead of starting over."""
    conversation_id = page.evaluate("""async () => {
        const post = (path, body) => fetch(path, {method: 'POST', body: JSON.stringify(body),
            headers: {'Content-Type': 'application/json'}}).then((r) => r.json());
        const c = await post('/api/conversations', {title: 'history'});
        for (let i = 0; i < 2; i++) {
            await post(`/api/conversations/${c.id}/messages`, {role: 'user',
                content: `Question ${i + 1}: what is bread made of, and how is it baked at home?`});
            await post(`/api/conversations/${c.id}/messages`, {role: 'assistant', provenance:
                {engine: 'browser', model: 'SmolLM2-135M-Instruct.Q4_1'}, content: 'Bread is flour, ' +
                'water, salt and yeast, mixed into a dough that rises, is shaped and baked in a hot ' +
                'oven until the crust is brown and the loaf sounds hollow when tapped.'});
        }
        return c.id;
    }""")
    page.evaluate("localStorage.setItem('bchat.engine', 'browser');"
                  "localStorage.setItem('bchat.backend', 'auto')")
    page.goto(f"{server.url}/c/{conversation_id}")  # a reload: nothing of this history in the page
    record_status(page)
    settings(page, max_tokens=8)
    page.evaluate("""() => {
        window.metaLog = [];
        new MutationObserver(() => {
            const meta = document.querySelector('[data-role=assistant][data-status=streaming] .meta');
            if (meta) window.metaLog.push(meta.textContent);
        }).observe(document.body, {childList: true, characterData: true, subtree: true});
    }""")
    status = page.get_by_test_id("browser-status-text")
    expect(status).to_contain_text("Reading the conversation", timeout=REPLY_TIMEOUT)
    reply = send(page, "Thanks!")  # while the history is being read
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)

    steps = [re.match(r"Reading the conversation: (\d+)/(\d+) tokens", line)
             for line, _ in page.evaluate("window.statusLog")]
    steps = [(int(m[1]), int(m[2])) for m in steps if m]
    # First the history (in 128-token steps), then the reply's own prompt, which starts from it.
    total = steps[0][1]
    history = [n for n, t in steps if t == total]
    assert total > 100 and history == sorted(history) and history[-1] == total, steps
    assert len(set(history)) >= 3, f"progress moved in steps: {steps}"
    assert all(n >= total for n, t in steps if t != total), steps
    meta_log = page.evaluate("window.metaLog")
    assert any(re.fullmatch(r"reading the conversation: \d+/\d+ tokens…", m) for m in meta_log), meta_log
    assert not any("loading the model" in m for m in meta_log[meta_log.index(next(
        m for m in meta_log if m.startswith("reading"))):]), meta_log

    assistant = stored_messages(page, server)[-1]
    meta = assistant["meta"]
    assert meta["prompt_cached"] >= total - 2, "the history read in the background was reused"
    assert meta["prompt_evaluated"] < 30, meta
    assert assistant["usage"]["prompt_tokens"] == meta["prompt_cached"] + meta["prompt_evaluated"]


def test_follow_up_only_evaluates_the_new_tokens(page, server):
    use_browser_engine(page)
    settings(page, max_tokens=12)
    first = send(page, "Name a colour.")
    expect(first).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    second = send(page, "Name another one.")
    expect(second).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    messages = stored_messages(page, server)
    follow_up = messages[-1]
    evaluated = follow_up["meta"]["prompt_evaluated"]
    total = follow_up["usage"]["prompt_tokens"]
    assert follow_up["meta"]["prompt_cached"] > 0
    assert evaluated < total / 2, f"re-read {evaluated} of {total} prompt tokens"


def test_stop_mid_reply_stores_a_stopped_partial(page, server):
    use_browser_engine(page)
    settings(page, max_tokens=300)
    reply = send(page, "Write a long story about a lighthouse keeper.")
    expect(reply.locator(".body")).not_to_be_empty(timeout=REPLY_TIMEOUT)
    page.get_by_test_id("stop").click()
    expect(reply).to_have_attribute("data-status", "stopped", timeout=30_000)
    assistant = stored_messages(page, server)[-1]
    assert assistant["status"] == "stopped" and assistant["engine"] == "browser"
    assert assistant["content"].strip()
    assert 0 < assistant["usage"]["completion_tokens"] < 300


def test_a_cut_off_browser_reply_continues_in_the_browser_and_has_its_facts(page, server):
    use_browser_engine(page)
    settings(page, max_tokens=6)
    reply = send(page, "Write a long story about a dragon.")
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    expect(reply.get_by_test_id("cut-off")).to_be_visible()
    before = stored_messages(page, server)[-1]
    assert before["engine"] == "browser" and before["finish_reason"] == "length"
    # ⓘ: how it was made and how it ran, as server replies show it
    reply.get_by_test_id("reply-options").click()
    facts = reply.get_by_test_id("reply-options-box")
    expect(facts).to_contain_text("browser (wasm-mt)")
    expect(facts).to_contain_text("Max tokens6")
    expect(facts).to_contain_text("tok/s")
    gets = server.counter.counts.get("GET", 0)
    shown = reply.locator(".body").inner_text()
    reply.get_by_test_id("continue").click()
    # the same message grows on screen, then settles
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(reply.locator(".body")).not_to_have_text(shown, timeout=REPLY_TIMEOUT)
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    messages = stored_messages(page, server)
    after = messages[-1]
    assert len(messages) == 2, "continued in place, not a new reply"
    assert after["id"] == before["id"] and after["engine"] == "browser", "it stayed in the browser"
    assert after["content"].startswith(before["content"]) and len(after["content"]) > len(before["content"])
    assert server.counter.counts.get("GET", 0) == gets


def test_reload_loads_the_model_from_the_browser_cache(page, server):
    gets_before = server.counter.counts.get("GET", 0)
    assert gets_before == 1
    page.reload()
    record_status(page)
    use_browser_engine(page)
    settings(page, max_tokens=8)
    reply = send(page, "Hi!")
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    expect(page.get_by_test_id("browser-status-text")).to_contain_text("from this browser's cache")
    # Reading the stored copy is not called a download.
    log = [line for line, _ in page.evaluate("window.statusLog")]
    assert not any(line.startswith("Downloading") for line in log), log
    assert any(line.startswith("Loading SmolLM2") and "from this browser's storage" in line
               for line in log), log
    assert server.counter.counts.get("GET", 0) == gets_before, "no second download of the model"


def test_wasm_single_thread_on_request(page, server):
    use_browser_engine(page, "wasm-st")
    settings(page, max_tokens=12)
    reply = send(page, "Count to three.")
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    expect(reply.locator(".meta")).to_contain_text("browser (wasm-st)")
    assistant = stored_messages(page, server)[-1]
    assert assistant["backend"] == "wasm-st" and assistant["meta"]["threads"] == 1


def test_one_conversation_two_engines(page, server):
    settings(page, max_tokens=10)
    use_browser_engine(page)
    first = send(page, "My name is Ada. Say hi.")
    expect(first).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    page.get_by_test_id("engine-select").select_option("server")
    second = send(page, "What is my name?")
    expect(second).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    use_browser_engine(page)
    third = send(page, "Say bye.")
    expect(third).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    replies = [m for m in stored_messages(page, server) if m["role"] == "assistant"]
    assert [r["engine"] for r in replies] == ["browser", "server", "browser"]
    assert [r["backend"] for r in replies] == ["wasm-mt", "llamacpp", "wasm-mt"]
    prompts = [r["usage"]["prompt_tokens"] for r in replies]
    assert prompts[0] < prompts[1] < prompts[2], "each engine saw the whole history"
    page.reload()
    metas = page.locator('[data-role="assistant"] .meta')
    expect(metas).to_have_count(3)
    expect(metas.nth(1)).to_contain_text("server (llamacpp)")
    expect(metas.nth(2)).to_contain_text("browser (wasm-mt)")


def test_forced_webgpu_without_a_usable_gpu_offers_the_server(page, server):
    use_browser_engine(page, "webgpu")
    reply = send(page, "Hello?")
    expect(reply).to_have_attribute("data-status", "failed", timeout=60_000)
    expect(page.get_by_test_id("error-text")).to_contain_text("WebGPU cannot run the model here")
    expect(page.get_by_test_id("use-server")).to_be_visible()
    page.get_by_test_id("use-server").click()
    expect(page.get_by_test_id("engine-select")).to_have_value("server")
    user, failed = stored_messages(page, server)
    assert user["content"] == "Hello?", "the message is kept even though the model never ran"
    assert failed["status"] == "failed"
    assert failed["meta"]["error"]["code"] == "webgpu_unavailable"
    # ...and the server engine takes over in the same conversation
    reply = send(page, "Hello again?")
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)


def test_a_tab_closed_mid_reply_leaves_an_interrupted_reply(browser, server):
    """The reply's row exists from the start and grows; closing the tab (pagehide) keeps it."""
    page = browser.new_page()
    page.goto(server.url + "/")
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    use_browser_engine(page)
    settings(page, max_tokens=400)
    reply = send(page, "Write a long story about a lighthouse keeper and the sea.")
    expect(reply).to_have_attribute("data-message-id", re.compile(".+"), timeout=REPLY_TIMEOUT)
    page.wait_for_function(
        "() => document.querySelector('[data-role=assistant] .body').innerText.length > 60",
        timeout=REPLY_TIMEOUT,
    )
    conversation_id = page.url.rsplit("/c/", 1)[1]
    message_id = reply.get_attribute("data-message-id")
    shown = reply.locator(".body").inner_text()
    page.close(run_before_unload=True)

    checker = browser.new_page()  # same profile: the same visitor
    checker.goto(server.url + "/")
    checker.wait_for_function(
        """async ([cid, mid]) => {
          const c = await (await fetch(`/api/conversations/${cid}`)).json();
          return c.messages.find((m) => m.id === mid)?.status === "interrupted";
        }""",
        arg=[conversation_id, message_id], polling=200, timeout=20_000,
    )
    stored = checker.evaluate(
        "async ([cid, mid]) => (await (await fetch(`/api/conversations/${cid}`)).json())"
        ".messages.find((m) => m.id === mid)",
        [conversation_id, message_id],
    )
    checker.close()
    assert stored["status"] == "interrupted" and stored["engine"] == "browser"
    assert stored["meta"]["stop_reason"] == "page_closed"
    assert len(stored["content"].strip()) >= 40, "the partial text was kept"
    words = shown.split()[:5]
    assert all(word in stored["content"] for word in words)


def test_an_attached_file_reaches_the_browser_engine(page, server, tmp_path):
    """The page's engine is given the file's text as the server engines are (one <file> block
    before the question, from GET /api/conversations/<id>/files), and records it (meta.files)."""
    facts = " ".join(f"Fact {i}: the lighthouse on island {i} is painted red." for i in range(12))
    note = tmp_path / "islands.txt"
    note.write_text(facts)
    settings(page, max_tokens=4)
    use_browser_engine(page)
    page.get_by_test_id("attach-input").set_input_files(str(note))
    expect(page.get_by_test_id("composer-files").get_by_test_id("file-chip")).to_have_attribute(
        "data-state", "ready")
    reply = send(page, "What colour is the lighthouse?")
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    user, assistant = stored_messages(page, server)
    assert [a["filename"] for a in user["attachments"]] == ["islands.txt"]
    assert assistant["engine"] == "browser"
    assert assistant["meta"]["files"] == [{"file": "islands.txt", "id": user["attachments"][0]["id"],
                                           "whole": True}]
    # the prompt held the file: more tokens than its words (a question alone is ~30)
    assert assistant["usage"]["prompt_tokens"] > len(facts.split())
