"""The browser engine's tool loop, through the API (tools/steps.py): what the page's model is
told and held to (GET …/tool-setup, the server's own instructions and grammar), and a step it
posts (POST …/messages/<id>/tool-step), refused before any tool runs unless the reply is the
visitor's own browser reply and its calls are of built-ins the conversation has on; stored as
a server step is, and shared and exported like one. The page's side, in chromium with the real
wllama, is tests/test_browser_engine_tools.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from webapp.engines.structured import answer_grammar, build_grammar, tool_instructions
from webapp.tools import build_tools

pytestmark = pytest.mark.databases("sqlite", "postgresql")

PROVENANCE = {"engine": "browser", "backend": "wasm-st", "model": "tiny-chat",
              "completion_tokens": 19, "finish_reason": "stop"}
MCP_SERVER = Path(__file__).with_name("mcp_server.py")


def call(name="calculator", arguments='{"expression": "6*7"}'):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def conversation(visitor, settings):
    status, conv = visitor.json("POST", "/api/conversations", {})
    assert status == 201, conv
    status, body = visitor.json("PATCH", f"/api/conversations/{conv['id']}", {"settings": settings})
    assert status == 200, body
    return conv["id"]


def page_reply(visitor, conversation_id, content="What is 6*7?"):
    """A user message and the page's reply to it, "streaming", as browser.js stores them."""
    status, user = visitor.json("POST", f"/api/conversations/{conversation_id}/messages",
                                {"role": "user", "content": content})
    assert status == 201, user
    status, reply = visitor.json("POST", f"/api/conversations/{conversation_id}/messages", {
        "role": "assistant", "content": "", "status": "streaming", "parent_id": user["id"],
        "provenance": {"engine": "browser", "backend": "wasm-st", "model": "tiny-chat"}})
    assert status == 201, reply
    return user, reply


def post_step(visitor, conversation_id, message_id, content, provenance=PROVENANCE):
    return visitor.json("POST", f"/api/conversations/{conversation_id}/messages/{message_id}"
                        "/tool-step", {"content": content, "provenance": provenance})


def setup(visitor, conversation_id, parent=None):
    query = f"?parent={parent}" if parent else ""
    return visitor.json("GET", f"/api/conversations/{conversation_id}/tool-setup{query}")


def messages(visitor, conversation_id):
    status, body = visitor.json("GET", f"/api/conversations/{conversation_id}")
    assert status == 200
    return body["messages"]


def test_setup_serves_the_servers_own_instructions_and_grammar(make_app, make_live_server):
    server = make_live_server(make_app(TOOL_STEPS=2))
    visitor = server.session()
    plain = conversation(visitor, {})
    status, body = setup(visitor, plain)
    assert status == 200 and body["tools"] == [] and body["grammar"] is None
    assert body["instructions"] == ""

    conversation_id = conversation(visitor, {"chat_tools": ["calculator"],
                                             "chat_tool_choice": "required"})
    status, body = setup(visitor, conversation_id)
    assert status == 200, body
    registry = build_tools({})
    specs = registry.specs(registry.enabled(["calculator"]))
    # The very text and grammar the embedded engine gives its own replies (engines/structured.py).
    assert body["tools"] == ["calculator"] and body["tool_choice"] == "required"
    assert body["grammar"] == build_grammar(None, specs, "required")
    assert body["instructions"] == tool_instructions(specs, "required")
    assert body["call_opening"] == "<tool_call>" and body["grammar"].startswith("root ::= tool-call")
    assert (body["steps"], body["max_steps"]) == (0, 2)

    # As the server's loop goes on: "auto" after a step, then text only (BCHAT_TOOL_STEPS=2).
    _, reply = page_reply(visitor, conversation_id)
    status, step = post_step(visitor, conversation_id, reply["id"], call())
    assert status == 200, step
    assert step["next"]["tool_choice"] == "auto" and step["next"]["steps"] == 1
    assert "free-text" in step["next"]["grammar"]
    status, again = setup(visitor, conversation_id, step["tool_messages"][-1]["id"])
    assert again == step["next"]
    status, second = post_step(visitor, conversation_id, step["reply"]["id"], call())
    assert status == 200, second
    last = second["next"]
    assert last["tool_choice"] == "none" and last["instructions"] == ""
    assert last["grammar"] == answer_grammar(None)  # text that cannot open a call, as the server holds it
    # A page that posted a third call anyway is refused: the model must answer in text.
    status, body = post_step(visitor, conversation_id, second["reply"]["id"], call())
    assert status == 400 and body["error"]["code"] == "too_many_tool_steps", body


def test_a_step_is_stored_as_a_server_step_and_shared_and_exported(make_app, make_live_server):
    server = make_live_server(make_app())
    visitor = server.session()
    conversation_id = conversation(visitor, {"chat_tools": ["calculator", "current_time"]})
    user, reply = page_reply(visitor, conversation_id)
    status, step = post_step(visitor, conversation_id, reply["id"], call())
    assert status == 200, step
    # The socket's step frame, the calls' frames, and what the next reply is held to.
    assert step["type"] == "step" and step["message_id"] == reply["id"]
    caller, (result,), following = step["message"], step["tool_messages"], step["reply"]
    assert caller["id"] == reply["id"] and caller["status"] == "complete"
    assert caller["finish_reason"] == "tool_calls" and caller["content"] == ""
    assert caller["usage"]["completion_tokens"] == 19  # the page's figures for the call
    (tool_call,) = caller["meta"]["tool_calls"]
    assert tool_call["function"]["name"] == "calculator"
    assert result["role"] == "tool" and result["content"] == "42"
    assert result["parent_id"] == caller["id"]
    assert result["meta"]["tool_call_id"] == tool_call["id"] and result["meta"]["name"] == "calculator"
    assert isinstance(result["meta"]["ms"], float)
    assert following["status"] == "streaming" and following["engine"] == "browser"
    assert following["parent_id"] == result["id"] and following["model"] == "tiny-chat"
    assert [f["type"] for f in step["tool_frames"]] == ["tool_call", "tool_result"]
    assert step["tool_frames"][0]["arguments"] == {"expression": "6*7"}
    assert step["tool_frames"][1]["content"] == "42"
    # Posting the same step again is refused: that reply is settled.
    status, body = post_step(visitor, conversation_id, reply["id"], call())
    assert status == 409 and body["error"]["code"] == "already_final"

    # The page writes the answer into the next reply and settles it, as any browser reply.
    status, answer = visitor.json(
        "PATCH", f"/api/conversations/{conversation_id}/messages/{following['id']}",
        {"content": "6*7 is 42.", "status": "complete", "provenance": PROVENANCE})
    assert status == 200, answer
    stored = messages(visitor, conversation_id)
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert [m["parent_id"] for m in stored] == [None, user["id"], reply["id"], result["id"]]

    status, exported = visitor.json("GET", f"/api/conversations/{conversation_id}/export?format=json")
    assert status == 200
    status, imported = visitor.json("POST", "/api/conversations/import", exported)
    assert status == 201, imported
    copy = messages(visitor, imported["id"])
    assert [m["role"] for m in copy] == ["user", "assistant", "tool", "assistant"]
    assert copy[1]["meta"]["tool_calls"] == caller["meta"]["tool_calls"]
    assert copy[2]["meta"]["tool_call_id"] == tool_call["id"] and copy[2]["content"] == "42"
    status, share = visitor.json("POST", f"/api/conversations/{conversation_id}/share", {})
    assert status in (200, 201), share
    status, _, page = server.session().request("GET", share["url"].replace(server.url, ""))
    assert status == 200 and b'data-testid="tool-result"' in page and b'data-testid="tool-call"' in page


def test_steps_are_refused_before_any_tool_runs(make_app, make_live_server, tmp_path):
    spec = {"name": "t", "command": sys.executable, "args": [str(MCP_SERVER), "stdio"]}
    (tmp_path / "mcp.json").write_text(__import__("json").dumps({"servers": [spec]}))
    server = make_live_server(make_app(MCP_FILE=str(tmp_path / "mcp.json")))
    visitor = server.session()
    status, listing = visitor.json("GET", "/api/tools")
    assert status == 200 and "t__add" in {t["name"] for t in listing["tools"]}

    def refused(conversation_id, message_id, content, code, status_code=400, who=visitor):
        status, body = post_step(who, conversation_id, message_id, content)
        assert (status, body["error"]["code"]) == (status_code, code), body

    conversation_id = conversation(visitor, {"chat_tools": ["calculator"]})
    user, reply = page_reply(visitor, conversation_id)
    refused(conversation_id, reply["id"], call("current_time", "{}"), "tool_not_enabled")
    refused(conversation_id, reply["id"], call("t__add", '{"a": 1, "b": 2}'), "tool_not_enabled")
    refused(conversation_id, reply["id"], call(arguments='"6*7"'), "bad_arguments")
    refused(conversation_id, reply["id"], call(arguments="[1]"), "bad_arguments")
    refused(conversation_id, reply["id"], "42, I think.", "no_tool_calls")
    refused(conversation_id, reply["id"], call()[:-3], "no_tool_calls")  # a call half written
    refused(conversation_id, reply["id"], "\n".join([call()] * 9), "too_many_calls")
    status, body = visitor.json(
        "POST", f"/api/conversations/{conversation_id}/messages/{reply['id']}/tool-step",
        {"content": ["not text"]})
    assert status == 400 and body["error"]["code"] == "bad_content"
    # Not the visitor's reply: the user's message, another visitor's conversation.
    refused(conversation_id, user["id"], call(), "not_found", 404)
    refused(conversation_id, reply["id"], call(), "not_found", 404, who=server.session())
    status, body = setup(server.session(), conversation_id)
    assert status == 404 and body["error"]["code"] == "not_found"
    # None of those ran a tool or stored a thing: the reply still streams, alone.
    assert [(m["role"], m["status"]) for m in messages(visitor, conversation_id)] == [
        ("user", "complete"), ("assistant", "streaming")]

    # A tool of the admin's MCP server runs only with the server engine: said at setup,
    # before the page stores anything, and at a step.
    mcp = conversation(visitor, {"chat_tools": ["calculator", "t__add"]})
    status, body = setup(visitor, mcp)
    assert status == 400 and body["error"]["code"] == "tool_not_in_browser"
    assert "t__add" in body["error"]["message"]
    _, mcp_reply = page_reply(visitor, mcp)
    refused(mcp, mcp_reply["id"], call(), "tool_not_in_browser")

    # Tools off; a reply written on the server (it runs its own tools).
    off = conversation(visitor, {})
    _, off_reply = page_reply(visitor, off)
    refused(off, off_reply["id"], call(), "tools_off")
    served = conversation(visitor, {"chat_tools": ["calculator"]})
    client = visitor.ws()
    client.chat("Hello", served, options={"max_tokens": 4})
    final, _ = client.until("done", "error")
    client.close()
    assert final["type"] == "done", final
    refused(served, final["message_id"], call(), "bad_engine")


def test_tool_steps_are_rate_limited_per_visitor(make_app, make_live_server):
    """Each step runs tools on the server, as a server chat does: BCHAT_RATE_LIMIT holds the
    page's steps too, per visitor, refused before anything runs; another visitor is unaffected."""
    server = make_live_server(make_app(RATE_LIMIT="2/minute"))
    visitor = server.session()
    conversation_id = conversation(visitor, {"chat_tools": ["calculator"]})
    _, reply = page_reply(visitor, conversation_id)
    for _ in range(2):  # posts that count, whatever they hold
        status, body = post_step(visitor, conversation_id, reply["id"], "42, I think.")
        assert status == 400 and body["error"]["code"] == "no_tool_calls", body
    status, body = post_step(visitor, conversation_id, reply["id"], call())
    assert status == 429 and body["error"]["code"] == "rate_limited", body
    assert [(m["role"], m["status"]) for m in messages(visitor, conversation_id)] == [
        ("user", "complete"), ("assistant", "streaming")], "no tool ran, nothing was stored"
    other = server.session()
    other_conversation = conversation(other, {"chat_tools": ["calculator"]})
    _, other_reply = page_reply(other, other_conversation)
    status, step = post_step(other, other_conversation, other_reply["id"], call())
    assert status == 200 and step["tool_messages"][0]["content"] == "42", step
