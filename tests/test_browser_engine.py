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
    """WSGI middleware: counts requests for model files, by method."""

    def __init__(self, app) -> None:
        self.app = app
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"].startswith("/models/"):
            with self.lock:
                method = environ["REQUEST_METHOD"]
                ranged = "HTTP_RANGE" in environ
                key = f"{method}{' range' if ranged else ''}"
                self.counts[key] = self.counts.get(key, 0) + 1
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundled_model):
    tmp = tmp_path_factory.mktemp("browser-engine")
    url = f"sqlite:///{tmp / 'b.sqlite3'}"
    migrate(url)
    app = create_app({"DATABASE_URL": url, "MODEL_PATH": str(bundled_model),
                      "SECRET_KEY": "browser-engine", "N_THREADS": 2})
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
    page.get_by_test_id("engine-select").select_option("browser")
    page.get_by_test_id("backend-select").select_option(backend)


def test_page_is_cross_origin_isolated_and_shows_the_download_first(page):
    assert page.evaluate("crossOriginIsolated") is True
    use_browser_engine(page)
    status = page.get_by_test_id("browser-status-text")
    expect(status).to_contain_text("SmolLM2-135M-Instruct.Q4_1")
    expect(status).to_contain_text("MiB")
    expect(status).to_contain_text("downloaded once")


def test_wasm_multi_thread_reply_streams_and_is_stored_with_provenance(page, server):
    use_browser_engine(page)
    settings(page, max_tokens=24)
    # Record every status line and progress value the page shows during the download.
    page.evaluate("""() => {
        window.statusLog = [];
        const text = document.querySelector('[data-testid="browser-status-text"]');
        const bar = document.querySelector('[data-testid="model-progress"]');
        new MutationObserver(() => window.statusLog.push([text.textContent, bar.value]))
            .observe(text, {childList: true, characterData: true, subtree: true});
    }""")
    reply = send(page, "Say hello in one short sentence.")
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    log = page.evaluate("window.statusLog")
    assert any(line.startswith("Preparing") and "can store" in line for line, _ in log), log
    downloading = [(line, value) for line, value in log if line.startswith("Downloading")]
    assert downloading, log
    assert "MiB/s" in downloading[-1][0] and "%" in downloading[-1][0]
    assert downloading[-1][1] == 1, "the bar reaches the end"
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
    assert assistant["usage"]["prompt_tokens"] > 5
    assert assistant["tokens_per_second"] > 0
    assert assistant["meta"]["threads"] == 2
    assert server.counter.counts.get("GET", 0) == 1, server.counter.counts


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


def test_reload_loads_the_model_from_the_browser_cache(page, server):
    gets_before = server.counter.counts.get("GET", 0)
    assert gets_before == 1
    page.reload()
    use_browser_engine(page)
    settings(page, max_tokens=8)
    reply = send(page, "Hi!")
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT)
    expect(page.get_by_test_id("browser-status-text")).to_contain_text("from this browser's cache")
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
