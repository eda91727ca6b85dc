"""Tools in the chat: the server runs the model's tool calls, stores each step in the tree, and
goes on until a text answer (runs/service.py's loop over tools/)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import HttpSession, free_port

from webapp.tools.builtins import BUILTINS, calculate
from webapp.tools.registry import Tool, ToolContext, ToolError, ToolRegistry

GREEDY = {"temperature": 0, "max_tokens": 400}


def new_conversation(visitor, settings):
    status, conv = visitor.json("POST", "/api/conversations", {})
    assert status in (200, 201)
    status, body = visitor.json("PATCH", f"/api/conversations/{conv['id']}", {"settings": settings})
    assert status == 200, body
    return conv["id"]


def run_chat(client, conversation_id, content="What is 6*7?", options=GREEDY):
    """Send a message; return (the final frame, every frame)."""
    client.chat(content, conversation_id, options=options)
    return client.until("done", "error")


def branch(visitor, conversation_id):
    status, body = visitor.json("GET", f"/api/conversations/{conversation_id}")
    assert status == 200
    by_id = {m["id"]: m for m in body["messages"]}
    path, node = [], body["current_message_id"]
    while node:
        path.append(by_id[node])
        node = by_id[node]["parent_id"]
    return list(reversed(path))


# -- the built-ins, alone ------------------------------------------------------------------------

@pytest.mark.parametrize("expression, value", [
    ("2+3*4", "14"), ("2^10", "1024"), ("(1+2)*(3+4)", "21"), ("sqrt(16) + abs(-2)", "6"),
    ("7 // 2", "3"), ("-2**2", "-4"), ("2**-1", "0.5"), ("factorial(5)", "120"),
])
def test_the_calculator_computes(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "open('/etc/passwd')", "(lambda: 1)()", "x", "1 if 1 else 2",
    "9**9**9", "10**5000", "2**100000", "1/0", "factorial(100000)", "(" * 400 + "1" + ")" * 400,
    "[1]*10", "'a'*3", "1e308*1e308", "().__class__", "",
])
def test_the_calculator_refuses_what_is_not_bounded_arithmetic(expression):
    with pytest.raises(ToolError):
        calculate(expression)


def test_a_tool_that_hangs_or_floods_or_raises_becomes_a_result_text():
    import threading

    release = threading.Event()
    registry = ToolRegistry([
        Tool("slow", "hangs", {"type": "object"}, lambda a, c: release.wait(30) and "late",
             timeout=0.2),
        Tool("flood", "floods", {"type": "object"}, lambda a, c: "x" * 100_000, max_result_chars=500),
        Tool("broken", "raises", {"type": "object"}, lambda a, c: 1 / 0),
    ])
    try:
        slow = registry.call("slow", "{}", ToolContext("o"))
        assert slow.error == "timeout" and "longer than" in slow.text
        flood = registry.call("flood", "{}", ToolContext("o"))
        assert flood.truncated and len(flood.text) <= 500 and "cut" in flood.text
        broken = registry.call("broken", "{}", ToolContext("o"))
        assert broken.error == "failed" and "ZeroDivisionError" in broken.text
        assert registry.call("flood", "not json", ToolContext("o")).error == "bad_arguments"
        assert registry.call("flood", "[1]", ToolContext("o")).error == "bad_arguments"
        assert registry.call("nothing", "{}", ToolContext("o")).error == "unknown_tool"
    finally:
        release.set()


# -- the loop, on the tiny model ----------------------------------------------------------------

def test_api_tools_lists_the_builtins(live_server):
    visitor = live_server.session()
    status, body = visitor.json("GET", "/api/tools")
    assert status == 200
    names = {t["name"] for t in body["tools"]}
    assert {"calculator", "current_time", "search_my_conversations"} <= names
    assert body["max_steps"] == 5


def test_settings_refuse_bad_tool_names(live_server):
    visitor = live_server.session()
    status, conv = visitor.json("POST", "/api/conversations", {})
    for bad in ({"chat_tools": "calculator"}, {"chat_tools": ["no spaces"]},
                {"chat_tool_choice": "always"}):
        status, body = visitor.json("PATCH", f"/api/conversations/{conv['id']}", {"settings": bad})
        assert status == 400 and body["error"]["code"] == "bad_settings", body


@pytest.mark.databases("sqlite", "postgresql")
def test_the_loop_stores_each_step_and_ends_in_text(make_app, make_live_server):
    server = make_live_server(make_app(TOOL_STEPS=2))
    visitor = server.session()
    conversation_id = new_conversation(visitor, {"chat_tools": ["calculator"],
                                                 "chat_tool_choice": "required"})
    client = visitor.ws()
    final, frames = run_chat(client, conversation_id)
    assert final["type"] == "done", final
    kinds = [f["type"] for f in frames]
    # At least one step: a call announced, its result, the step stored; then a text answer.
    assert "tool_call" in kinds and "tool_result" in kinds and "step" in kinds
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("step")
    steps = [f for f in frames if f["type"] == "step"]
    assert 1 <= len(steps) <= 2  # BCHAT_TOOL_STEPS, then the model must answer
    assert final["message_id"] == steps[-1]["reply"]["id"]
    assert final["message"]["status"] == "complete"
    assert not final["message"]["meta"].get("tool_calls")
    path = branch(visitor, conversation_id)
    roles = [m["role"] for m in path]
    assert roles[0] == "user" and roles[-1] == "assistant"
    assert roles[1:-1] == ["assistant", "tool"] * len(steps)
    for caller, result in zip(path[1:-1:2], path[2:-1:2], strict=True):
        assert caller["finish_reason"] == "tool_calls"
        call = caller["meta"]["tool_calls"][0]
        assert call["function"]["name"] == "calculator"
        assert result["meta"]["tool_call_id"] == call["id"] and result["meta"]["name"] == "calculator"
        assert isinstance(result["meta"]["ms"], float)
    # Exported and imported like any message: the steps come back with their meta.
    status, exported = visitor.json("GET", f"/api/conversations/{conversation_id}/export?format=json")
    assert status == 200
    status, imported = visitor.json("POST", "/api/conversations/import", exported)
    assert status == 201, imported
    copy = branch(visitor, imported["id"])
    assert [m["role"] for m in copy] == roles
    assert copy[1]["meta"]["tool_calls"] == path[1]["meta"]["tool_calls"]
    assert copy[2]["meta"]["tool_call_id"] == path[2]["meta"]["tool_call_id"]
    status, _, markdown = visitor.request(
        "GET", f"/api/conversations/{conversation_id}/export?format=markdown")
    assert status == 200 and b"## Tool" in markdown
    # A share shows the steps as escaped text.
    status, share = visitor.json("POST", f"/api/conversations/{conversation_id}/share", {})
    assert status in (200, 201), share
    status, _, page = visitor.request("GET", share["url"].replace(server.url, ""))
    assert status == 200 and b'data-testid="tool-result"' in page and b'data-testid="tool-call"' in page
    client.close()


# -- MCP servers (tests/mcp_server.py, over stdio and Streamable HTTP) ------------------------

MCP_SERVER = Path(__file__).with_name("mcp_server.py")


@pytest.fixture(scope="module")
def mcp_http():
    """The test MCP server over Streamable HTTP, on a free port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(MCP_SERVER), "http", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # its port answers once it serves
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "the MCP server exited"
                time.sleep(0.1)
        else:
            raise AssertionError("the MCP server did not answer on its port in 60 s")
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)


def mcp_file(tmp_path, **servers) -> str:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"servers": [{"name": name, **spec} for name, spec in servers.items()]}))
    return str(path)


def stdio_spec(**more):
    return {"command": sys.executable, "args": [str(MCP_SERVER), "stdio"], **more}


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_an_mcp_tool_is_listed_called_stored_and_answered(transport, make_app, make_live_server,
                                                          tmp_path, request):
    spec = stdio_spec() if transport == "stdio" else {"url": request.getfixturevalue("mcp_http")}
    server = make_live_server(make_app(MCP_FILE=mcp_file(tmp_path, t=spec), TOOL_STEPS=1))
    visitor = server.session()
    status, listing = visitor.json("GET", "/api/tools")
    assert status == 200
    assert {"t__add", "t__hostile"} <= {t["name"] for t in listing["tools"]}
    assert listing["servers"] == [{"name": "t", "transport": transport, "error": None,
                                   "tools": ["t__add", "t__hostile", "t__flood", "t__gate",
                                             "t__hang"]}]
    conversation_id = new_conversation(visitor, {"chat_tools": ["t__add"],
                                                 "chat_tool_choice": "required"})
    client = visitor.ws()
    final, frames = run_chat(client, conversation_id, "Add 2 and 40.")
    assert final["type"] == "done", final
    result = next(f for f in frames if f["type"] == "tool_result")
    call = next(f for f in frames if f["type"] == "tool_call")
    assert call["name"] == "t__add" and set(call["arguments"]) == {"a", "b"}
    # Whatever numbers the tiny model wrote, the server added them.
    assert result.get("error") is None, result
    assert result["content"] == str(call["arguments"]["a"] + call["arguments"]["b"])
    path = branch(visitor, conversation_id)
    assert [m["role"] for m in path] == ["user", "assistant", "tool", "assistant"]
    assert path[2]["content"] == result["content"]
    assert final["message"]["status"] == "complete"
    # BCHAT_TOOL_STEPS=1 reached: the model was made to answer (tool_choice "none"); the
    # first step had to call (required), the reply's options say so.
    assert final["message"]["meta"]["options"]["tool_choice"] == "none"
    assert path[1]["meta"]["options"]["tool_choice"] == "required"
    client.close()


def test_mcp_limits_a_hanging_tool_and_a_flood(make_app, tmp_path):
    app = make_app(MCP_FILE=mcp_file(tmp_path, t=stdio_spec(timeout=3, max_result_chars=1000)))
    registry = app.extensions["bchat"].tools
    hung = registry.call("t__hang", {"n": 1}, ToolContext("o"))
    # The SDK's own time-out (3 s) or the registry's, later: either way a result, not a hang.
    assert hung.error in ("timeout", "failed") and hung.text.startswith("Error:")
    flood = registry.call("t__flood", {"n": 1}, ToolContext("o"))
    assert flood.truncated and len(flood.text) <= 1000
    bad = registry.call("t__add", {"a": "x"}, ToolContext("o"))
    assert bad.error == "failed" and "valid integer" in bad.text


def test_an_mcp_server_that_is_down_is_reported_not_fatal(make_app, make_live_server, tmp_path):
    server = make_live_server(make_app(MCP_FILE=mcp_file(
        tmp_path, gone={"url": f"http://127.0.0.1:{free_port()}/mcp"})))
    visitor = server.session()
    status, listing = visitor.json("GET", "/api/tools")
    assert status == 200
    assert listing["servers"][0]["name"] == "gone" and listing["servers"][0]["error"]
    assert "calculator" in {t["name"] for t in listing["tools"]}


def test_the_mcp_file_is_checked(tmp_path):
    from webapp.tools.mcp import load_servers

    for bad in ([{"name": "x"}], [{"name": "x y", "url": "http://h/"}],
                [{"name": "a", "url": "http://h/", "command": "c"}],
                [{"name": "a", "url": "http://h/"}, {"name": "a", "url": "http://h/"}]):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({"servers": bad}))
        with pytest.raises(ValueError):
            load_servers(path)


# -- stop, continue, the step limit --------------------------------------------------------------

@pytest.mark.databases("sqlite", "postgresql")
def test_stop_among_the_tools_keeps_the_calls_and_continue_runs_them(make_app, make_live_server):
    import threading

    release = threading.Event()
    ran = []

    def slow(arguments, context):
        ran.append(arguments)
        release.wait(30)
        return "slow answer"

    app = make_app(TOOL_STEPS=1)
    app.extensions["bchat"].tools.builtins.append(Tool(
        "slow", "waits", {"type": "object", "properties": {"n": {"type": "integer"}},
                          "required": ["n"]}, slow, timeout=60))
    server = make_live_server(app)
    visitor = server.session()
    conversation_id = new_conversation(visitor, {"chat_tools": ["slow"], "chat_tool_choice": "required"})
    client = visitor.ws()
    client.chat("go", conversation_id, options=GREEDY)
    call, _ = client.until("tool_call")
    client.send({"type": "stop", "message_id": call["message_id"]})
    final, frames = client.until("done", "error")
    release.set()
    assert final["type"] == "done" and final["message"]["status"] == "stopped"
    assert not any(f["type"] == "step" for f in frames)
    stopped = final["message"]
    assert stopped["meta"]["tool_calls"][0]["function"]["name"] == "slow"
    assert [m["role"] for m in branch(visitor, conversation_id)] == ["user", "assistant"]
    # Continue: the calls run (the tool is answered now), the step is stored, the model answers.
    client.send({"type": "continue", "message_id": stopped["id"], "options": GREEDY})
    final, frames = client.until("done", "error")
    assert final["type"] == "done", final
    result = next(f for f in frames if f["type"] == "tool_result")
    assert result["content"] == "slow answer" and len(ran) == 2
    path = branch(visitor, conversation_id)
    assert [m["role"] for m in path] == ["user", "assistant", "tool", "assistant"]
    assert path[1]["id"] == stopped["id"] and path[1]["status"] == "complete"
    assert path[1]["finish_reason"] == "tool_calls" and path[1]["content"] == ""
    assert path[2]["content"] == "slow answer" and path[3]["status"] == "complete"
    client.close()


def test_a_tool_that_times_out_or_floods_is_stored_as_its_error(make_app, make_live_server):
    import threading

    never = threading.Event()
    app = make_app(TOOL_STEPS=1)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    app.extensions["bchat"].tools.builtins.extend([
        Tool("stuck", "hangs", schema, lambda a, c: never.wait(30) and "late", timeout=0.5),
        Tool("huge", "floods", schema, lambda a, c: "z" * 50_000, max_result_chars=300)])
    server = make_live_server(app)
    visitor = server.session()
    client = visitor.ws()
    try:
        for name, check in (("stuck", lambda r: r["error"] == "timeout"),
                            ("huge", lambda r: r["truncated"] and len(r["content"]) <= 300)):
            conversation_id = new_conversation(visitor, {"chat_tools": [name],
                                                         "chat_tool_choice": "required"})
            final, frames = run_chat(client, conversation_id)
            assert final["type"] == "done", final
            result = next(f for f in frames if f["type"] == "tool_result")
            assert check(result), result
            stored = branch(visitor, conversation_id)[2]
            assert stored["role"] == "tool" and stored["content"] == result["content"]
    finally:
        never.set()
        client.close()


def test_the_calculator_on_the_bundled_model(make_app, make_live_server, bundled_model):
    """SmolLM2 with tool_choice required: the protocol, not the model's arithmetic."""
    server = make_live_server(make_app(MODEL_PATH=str(bundled_model), TOOL_STEPS=1))
    visitor = server.session()
    conversation_id = new_conversation(visitor, {"chat_tools": ["calculator"],
                                                 "chat_tool_choice": "required"})
    client = visitor.ws()
    final, frames = run_chat(client, conversation_id, "What is 12 times 34? Use the calculator.",
                             {"temperature": 0, "max_tokens": 96})
    assert final["type"] == "done", final
    call = next(f for f in frames if f["type"] == "tool_call")
    result = next(f for f in frames if f["type"] == "tool_result")
    assert call["name"] == "calculator"
    try:
        expected = calculate(call["arguments"]["expression"])
    except ToolError as exc:
        expected = f"Error: {exc}"
    assert result["content"] == expected
    path = branch(visitor, conversation_id)
    assert [m["role"] for m in path] == ["user", "assistant", "tool", "assistant"]
    assert path[-1]["content"].strip() and not path[-1]["meta"].get("tool_calls")
    client.close()


def test_search_my_conversations_reads_only_the_visitors_own(app):
    services = app.extensions["bchat"]
    services.chats.add_user_message("alice", None, "the zebra code is 4417")
    services.chats.add_user_message("bob", None, "another zebra, bob's")
    own = services.tools.call("search_my_conversations", {"query": "zebra"},
                              ToolContext("alice", db=services.db))
    assert own.error is None and "4417" in own.text and "bob" not in own.text
    none = services.tools.call("search_my_conversations", {"query": "zebra"},
                               ToolContext("carol", db=services.db))
    assert none.text == "No conversations match."


def test_current_time_takes_a_timezone():
    registry = ToolRegistry(list(BUILTINS))
    paris = registry.call("current_time", {"timezone": "Europe/Paris"}, ToolContext("o"))
    assert paris.error is None and "(Europe/Paris)" in paris.text
    assert paris.text.split()[1][-6:] in ("+01:00", "+02:00")
    bad = registry.call("current_time", {"timezone": "Mars/Olympus"}, ToolContext("o"))
    assert bad.error == "failed" and "unknown timezone" in bad.text


def test_a_crash_in_the_loop_keeps_what_was_stored_and_continue_resumes(tmp_path, tiny_model):
    """SIGKILL while a tool runs (a real `bchat serve`): after a restart the reply that called
    is "interrupted" with its call, and continue runs the call and finishes the loop."""
    import os
    import signal

    from test_durability import app_env, serve, stop

    gate = tmp_path / "gate"
    gate.write_text("closed")
    config = mcp_file(tmp_path, t=stdio_spec(env={"BCHAT_TEST_GATE": str(gate)}, timeout=120))
    env = app_env(tmp_path, tiny_model, BCHAT_MCP_FILE=config, BCHAT_TOOL_STEPS="1")
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(env, log, port)
    try:
        visitor = HttpSession(f"http://127.0.0.1:{port}")
        conversation_id = new_conversation(visitor, {"chat_tools": ["t__gate"],
                                                     "chat_tool_choice": "required"})
        client = visitor.ws()
        client.chat("wait at the gate", conversation_id, options=GREEDY)
        call, _ = client.until("tool_call")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        gate.unlink()
        proc = serve(env, log, port)
        path = branch(visitor, conversation_id)
        assert [m["role"] for m in path] == ["user", "assistant"]
        caller = path[1]
        assert caller["id"] == call["message_id"] and caller["status"] == "interrupted"
        client = visitor.ws()
        client.send({"type": "continue", "message_id": caller["id"], "options": GREEDY})
        final, frames = client.until("done", "error")
        assert final["type"] == "done", final
        assert next(f for f in frames if f["type"] == "tool_result")["content"] == "opened"
        path = branch(visitor, conversation_id)
        assert [m["role"] for m in path] == ["user", "assistant", "tool", "assistant"]
        assert path[1]["status"] == "complete" and path[1]["finish_reason"] == "tool_calls"
        assert path[3]["status"] == "complete"
        client.close()
    finally:
        stop(proc)


def test_the_loop_through_an_openai_compatible_upstream(make_app, make_live_server, tiny_model):
    """The other server engine: `bchat worker` as an OpenAI-compatible upstream, whose tool
    calls come back as OpenAI's tool_calls (not text); the loop runs them the same way."""
    from test_upstreams import start_worker
    from test_upstreams import stop as stop_worker

    port = free_port()
    worker = start_worker(tiny_model, port)
    try:
        server = make_live_server(make_app(WORKER_URL=f"http://127.0.0.1:{port}", TOOL_STEPS=1))
        visitor = server.session()
        conversation_id = new_conversation(visitor, {"chat_tools": ["calculator"],
                                                     "chat_tool_choice": "required"})
        client = visitor.ws()
        final, frames = run_chat(client, conversation_id)
        assert final["type"] == "done", final
        assert final["message"]["backend"] == "worker"  # the OpenAI-compatible engine
        call = next(f for f in frames if f["type"] == "tool_call")
        assert call["name"] == "calculator" and "expression" in call["arguments"]
        path = branch(visitor, conversation_id)
        assert [m["role"] for m in path] == ["user", "assistant", "tool", "assistant"]
        assert path[1]["meta"]["tool_calls"][0]["id"] == path[2]["meta"]["tool_call_id"]
        client.close()
    finally:
        stop_worker(worker)


def test_the_model_still_sees_the_files_after_a_tool_step(make_app, make_live_server):
    """A step's next reply is given the branch's files again, as the first was (meta.files),
    and its prompt holds them: the same loop without the file reads far fewer tokens."""
    from test_attachments import upload

    server = make_live_server(make_app(TOOL_STEPS=1))
    visitor = server.session()
    notes = ("The harbour master keeps the ledger in the blue cabinet. " * 40).encode()
    status, info = upload(visitor, "ledger.txt", notes, "text/plain")
    assert status == 201, info
    finals = {}
    for name, attachments in (("with", [info["id"]]), ("without", [])):
        conversation_id = new_conversation(visitor, {"chat_tools": ["calculator"],
                                                     "chat_tool_choice": "required"})
        client = visitor.ws()
        client.chat("Where is the ledger?", conversation_id, options=GREEDY,
                    attachments=attachments)
        final, frames = client.until("done", "error")
        client.close()
        assert final["type"] == "done", final
        assert [f["type"] for f in frames].count("step") == 1
        finals[name] = final["message"]
    given = [{"file": "ledger.txt", "id": info["id"], "whole": True}]
    assert finals["with"]["meta"]["files"] == given
    assert "files" not in finals["without"]["meta"]
    assert (finals["with"]["usage"]["prompt_tokens"]
            > finals["without"]["usage"]["prompt_tokens"] + 200)


def test_the_loops_last_reply_is_held_to_text_that_opens_no_call(make_app, tiny_model):
    """Past the step limit a reply may not open a call: pushed hard toward "<" (logit_bias),
    the tiny model's free text starts with it; held to answer_grammar it never does (the
    grammar the server's loop and the page's give that reply)."""
    import threading

    from llama_cpp import Llama

    from webapp.engines.base import Token
    from webapp.engines.structured import answer_grammar
    from webapp.options import GenerationOptions

    vocab = Llama(model_path=str(tiny_model), vocab_only=True, verbose=False)
    (opening,) = vocab.tokenize(b"<", add_bos=False, special=False)
    engine = make_app().extensions["bchat"].engines.engines[0]
    user = [{"role": "user", "content": "What is 6*7?"}]

    def reply(grammar):
        options = GenerationOptions(max_tokens=4, temperature=0, grammar=grammar,
                                    logit_bias={str(opening): 100.0})
        return "".join(item.text for item in engine.stream("tiny-chat", user, options,
                                                            threading.Event())
                       if isinstance(item, Token))

    assert reply(None).startswith("<")
    held = reply(answer_grammar(None))
    assert held and not held.lstrip().startswith("<")
