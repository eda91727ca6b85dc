"""The browser engine runs the tool loop in the page: the real vendored wllama runs the tiny
test model in chromium, held to the server's tool grammar; its call is posted as a step, which
the server runs (the calculator) and stores as it stores its own; the model goes on in the
next reply and answers in text. The blocks fold, and are the same after a reload. Checks the
protocol, not the tiny model's wit. Screenshots (both sizes, light and dark) go to
$BCHAT_SCREENSHOTS (default: a pytest temporary folder)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

SIZES = [("wide", {"width": 1366, "height": 850}), ("phone", {"width": 390, "height": 844})]
REPLY_MS = 120_000


@pytest.fixture
def server(make_app, make_live_server):
    # One step, then the model must answer in text (tool_choice "none", no grammar).
    return make_live_server(make_app(TOOL_STEPS=1))


def calculator_page(page, server, max_tokens=400):
    """The chat with the browser engine (one thread), the calculator on and a call required
    first; greedy, with room for the tiny model's whole call."""
    page.goto(server.url + "/")
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    page.get_by_test_id("engine-select").select_option("browser")
    page.get_by_test_id("backend-select").select_option("wasm-st")
    page.get_by_test_id("settings").locator("summary").click()
    page.get_by_test_id("temperature").fill("0")
    page.get_by_test_id("max-tokens").fill(str(max_tokens))
    page.get_by_test_id("tool-calculator").check()
    page.get_by_test_id("tools-required").check()
    page.get_by_test_id("settings-save").click()
    expect(page.get_by_test_id("settings-status")).to_contain_text("Saved")
    page.get_by_test_id("settings").locator("summary").click()
    return page


def stored(page):
    conversation_id = page.url.rsplit("/c/", 1)[1]
    return page.evaluate("async id => (await (await fetch(`/api/conversations/${id}`)).json())",
                         conversation_id)


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size, viewport", SIZES)
def test_a_browser_turn_takes_a_tool_step_and_answers(server, pages, shots, size, viewport, scheme):
    page = calculator_page(pages(viewport, scheme), server)
    steps = []  # each tool-step the page posts, as the server answered it
    page.on("response", lambda r: steps.append(r) if r.url.endswith("/tool-step") else None)

    page.get_by_test_id("composer").fill("What is 6*7? Use the calculator.")
    page.get_by_test_id("composer").press("Enter")
    # The step shows as soon as it is stored, before the answer is written.
    expect(page.get_by_test_id("tool-call").first).to_be_visible(timeout=REPLY_MS)
    last = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(last).to_have_attribute("data-status", "complete", timeout=REPLY_MS)
    expect(page.get_by_test_id("stop")).to_be_hidden(timeout=REPLY_MS)
    assert [r.status for r in steps] == [200]

    # Stored as the server engines store a step: the reply that called (its tool_calls), the
    # result, and the answer under it, all written in the page.
    tree = stored(page)
    by_id = {m["id"]: m for m in tree["messages"]}
    path, node = [], tree["current_message_id"]
    while node:
        path.append(by_id[node])
        node = by_id[node]["parent_id"]
    user, caller, result, answer = reversed(path)
    assert [m["role"] for m in (user, caller, result, answer)] == ["user", "assistant", "tool",
                                                                   "assistant"]
    assert caller["engine"] == "browser" and caller["backend"] == "wasm-st"
    assert caller["finish_reason"] == "tool_calls" and caller["status"] == "complete"
    (call,) = caller["meta"]["tool_calls"]
    assert call["function"]["name"] == "calculator"
    assert caller["usage"]["completion_tokens"] > 0 and caller["meta"]["threads"] == 1
    # Whatever expression the tiny model wrote, the server's calculator answered it.
    assert result["meta"]["name"] == "calculator" and result["meta"]["tool_call_id"] == call["id"]
    assert result["content"]
    assert answer["engine"] == "browser" and answer["status"] == "complete"
    assert answer["finish_reason"] != "tool_calls" and not answer["meta"].get("tool_calls")
    assert "<tool_call>" not in answer["content"]  # held to text: the step limit was reached

    # The blocks fold: the result's text shows when unfolded, as the very text stored.
    block = page.get_by_test_id("tool-result").first
    text = block.get_by_test_id("tool-text")
    expect(text).to_be_hidden()
    block.locator("summary").click()
    expect(text).to_be_visible()
    assert text.inner_text() == result["content"]
    page.get_by_test_id("tool-call").first.locator("summary").click()
    expect(page.get_by_test_id("tool-call").first.get_by_test_id("tool-text")).to_contain_text(
        "expression")
    page.screenshot(path=str(shots / f"browser-tool-step-{size}-{scheme}.png"))
    block.locator("summary").click()
    expect(text).to_be_hidden()

    # After a reload, the same blocks from the stored rows.
    page.reload()
    expect(page.get_by_test_id("tool-call")).to_have_count(1)
    expect(page.get_by_test_id("tool-result")).to_have_count(1)
    page.get_by_test_id("tool-result").first.locator("summary").click()
    expect(page.get_by_test_id("tool-result").first.get_by_test_id("tool-text")).to_have_text(
        result["content"])


def test_stop_while_the_tools_run_ends_the_loop_and_keeps_the_step(server, pages):
    """Stop pressed while the step is being stored (the tool-step request is held until the
    stop is in): the step is kept, the loop ends, and its next reply is stored "stopped"."""
    page = calculator_page(pages(), server)
    posted = []

    def stop_first(route):
        posted.append(route.request.url)
        page.get_by_test_id("stop").click()  # the reply's controller aborts, mid-request
        route.continue_()

    page.route("**/tool-step", stop_first)
    page.get_by_test_id("composer").fill("What is 6*7? Use the calculator.")
    page.get_by_test_id("composer").press("Enter")
    last = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(last).to_have_attribute("data-status", "stopped", timeout=REPLY_MS)
    expect(page.get_by_test_id("stop")).to_be_hidden()
    assert len(posted) == 1
    tree = stored(page)
    roles = [(m["role"], m["status"]) for m in tree["messages"]]
    assert roles == [("user", "complete"), ("assistant", "complete"), ("tool", "complete"),
                     ("assistant", "stopped")], roles
    after = tree["messages"][-1]
    assert after["content"] == "" and after["meta"]["stop_reason"] == "user"
    expect(page.get_by_test_id("tool-call")).to_have_count(1)


def test_continue_runs_the_call_a_closed_page_left_unrun(server, pages):
    """A page closed after its reply wrote a call but before the step was stored leaves the
    reply "interrupted" holding the call: Continue in the browser runs that call first (as the
    server's continue does), then the model answers."""
    page = calculator_page(pages(), server)
    conversation_id = page.evaluate("""async () => {
        const send = (method, path, body) => fetch(path, {method, body: JSON.stringify(body),
            headers: {'Content-Type': 'application/json'}}).then((r) => r.json());
        const conv = await send('POST', '/api/conversations', {});
        await send('PATCH', `/api/conversations/${conv.id}`,
                   {settings: {chat_tools: ['calculator'], chat_tool_choice: 'required'}});
        const user = await send('POST', `/api/conversations/${conv.id}/messages`,
                                {role: 'user', content: 'What is 6*7?'});
        await send('POST', `/api/conversations/${conv.id}/messages`, {role: 'assistant',
            content: '<tool_call>\\n{"name": "calculator", "arguments": {"expression": "6*7"}}'
                     + '\\n</tool_call>',
            status: 'interrupted', parent_id: user.id,
            provenance: {engine: 'browser', backend: 'wasm-st', model: 'tiny-chat',
                         completion_tokens: 21, finish_reason: 'interrupted',
                         meta: {stop_reason: 'page_closed'}}});
        return conv.id;
    }""")
    page.goto(f"{server.url}/c/{conversation_id}")
    page.get_by_test_id("engine-select").select_option("browser")
    page.get_by_test_id("continue").click()
    expect(page.get_by_test_id("tool-result")).to_have_count(1, timeout=REPLY_MS)
    last = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(last).to_have_attribute("data-status", "complete", timeout=REPLY_MS)
    expect(page.get_by_test_id("stop")).to_be_hidden(timeout=REPLY_MS)
    user, caller, result, answer = stored(page)["messages"]
    assert (caller["status"], caller["finish_reason"]) == ("complete", "tool_calls")
    assert caller["usage"]["completion_tokens"] == 21 and "stop_reason" not in caller["meta"]
    assert result["content"] == "42" and result["parent_id"] == caller["id"]
    assert answer["parent_id"] == result["id"] and answer["engine"] == "browser"


def test_a_page_closed_mid_loop_keeps_the_step_and_its_reply_is_interrupted(server, pages):
    """Closed while the model writes the reply after a step (pagehide): the step stays stored,
    and that reply keeps what it wrote, "interrupted", as any browser reply."""
    page = calculator_page(pages(), server, max_tokens=3000)  # an answer that takes a while
    page.get_by_test_id("composer").fill("What is 6*7? Use the calculator.")
    page.get_by_test_id("composer").press("Enter")
    expect(page.get_by_test_id("tool-result")).to_have_count(1, timeout=REPLY_MS)
    # The reply under the step has started to show text: close the tab now.
    answer = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(answer).to_have_attribute("data-status", "streaming")
    page.wait_for_function("() => [...document.querySelectorAll('[data-role=assistant]')].at(-1)"
                           ".querySelector('.body').innerText.trim().length > 0", timeout=REPLY_MS)
    conversation_id = page.url.rsplit("/c/", 1)[1]
    context = page.context
    page.close(run_before_unload=True)
    checker = context.new_page()  # the same visitor
    checker.goto(server.url + "/")
    checker.wait_for_function(
        """async (cid) => {
          const c = await (await fetch(`/api/conversations/${cid}`)).json();
          return c.messages.at(-1).status !== "streaming";
        }""", arg=conversation_id, polling=200, timeout=20_000)
    tree = checker.evaluate("async id => (await (await fetch(`/api/conversations/${id}`)).json())",
                            conversation_id)
    user, caller, result, last = tree["messages"]
    assert caller["finish_reason"] == "tool_calls" and result["role"] == "tool"
    assert last["parent_id"] == result["id"] and last["status"] == "interrupted"
    assert last["meta"]["stop_reason"] == "page_closed" and last["content"]
