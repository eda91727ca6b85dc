"""Tools in the model's own chat template: a template with a tools section (Hermes/Qwen style, or
Llama 3.1's) gets the tool list in its render context and writes the tool turns itself, with none
of bchat's instructions; a template without one (the tiny model's ChatML, SmolLM2's) gets bchat's
short instructions. The tool call comes back in OpenAI's shape through the official client either
way: the grammar holds the reply to the call format the template writes (``<tool_call>`` JSON
for Hermes and bchat's instructions, a bare {"name", "parameters"} object for Llama 3.1)."""

from __future__ import annotations

import json
import time

import jsonschema_rs
import openai
import pytest
from llama_cpp import Llama
from test_openai_api import LOOSE, TIME_TOOL, WEATHER_TOOL
from tiny_model import CHATML_TEMPLATE, HERMES_TOOLS_TEMPLATE, LLAMA31_TEMPLATE, write_tiny_model

from webapp.engines.inference import PromptBuilder
from webapp.engines.structured import (
    LLAMA3,
    ReplySplitter,
    build_grammar,
    prompt_messages,
    split_reply,
    template_tool_style,
)

HISTORY = [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
]
FALLBACK_MARK = "Functions (JSON schemas)"  # the start of bchat's own instructions


@pytest.fixture(scope="module")
def hermes_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("hermes") / "tiny-hermes.gguf",
                            chat_template=HERMES_TOOLS_TEMPLATE)


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("llama31") / "tiny-llama31.gguf",
                            chat_template=LLAMA31_TEMPLATE)


def builder(path) -> PromptBuilder:
    return PromptBuilder(Llama(model_path=str(path), n_ctx=512, verbose=False))


def prompt(build: PromptBuilder, messages, tools, tool_choice) -> str:
    return build.text(*prompt_messages(build.tool_style, messages, tools, tool_choice))


def test_a_template_with_a_tools_section_renders_the_tools_itself(hermes_model, tiny_model):
    hermes = builder(hermes_model)
    assert hermes.tool_style == "hermes"
    text = prompt(hermes, HISTORY, [WEATHER_TOOL, TIME_TOOL], "auto")
    # The tool list in the template's own <tools> section, in OpenAI's shape, one a line.
    listed = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].split("\n")
    assert [json.loads(line) for line in listed] == [
        {"type": "function", "function": WEATHER_TOOL["function"]},
        {"type": "function", "function": TIME_TOOL["function"]}]
    # The call in the history as the template writes it (arguments an object), the result in
    # its <tool_response>, and no instructions of bchat's.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n' \
           "</tool_call><|im_end|>" in text
    assert '<|im_start|>user\n<tool_response>\n{"sky": "clear"}\n</tool_response>' in text
    assert FALLBACK_MARK not in text
    # A named function: only that one is offered; "none": no tools section at all.
    named = prompt(hermes, HISTORY[:1], [WEATHER_TOOL, TIME_TOOL],
                   {"type": "function", "function": {"name": "get_time"}})
    assert '"name": "get_time"' in named and '"name": "get_weather"' not in named
    assert "<tools>" not in prompt(hermes, HISTORY, [WEATHER_TOOL], "none")

    plain = builder(tiny_model)  # ChatML without a tools section: bchat's short instructions
    assert plain.tool_style is None
    text = prompt(plain, HISTORY, [WEATHER_TOOL], "auto")
    assert FALLBACK_MARK in text and "<tools>" not in text
    assert json.dumps([WEATHER_TOOL["function"]], separators=(",", ":")) in text
    assert '<tool_response>\n{"sky": "clear"}\n</tool_response>' in text
    assert FALLBACK_MARK not in prompt(plain, HISTORY[:1], [WEATHER_TOOL], "none")


def test_a_tool_use_template_beside_the_default_renders_requests_with_tools(tmp_path):
    """GGUFs like Hermes 3's carry tokenizer.chat_template.tool_use: llama.cpp renders requests
    with tools (and so their tool turns) with it, and the rest with the default."""
    default = "(default)" + CHATML_TEMPLATE
    path = write_tiny_model(tmp_path / "tool-use.gguf", chat_template=[
        {"name": "default", "template": default},
        {"name": "tool_use", "template": HERMES_TOOLS_TEMPLATE}])
    both = builder(path)
    assert both.tool_style == "hermes"
    with_tools = prompt(both, HISTORY, [WEATHER_TOOL], "auto")
    assert "<tools>" in with_tools and FALLBACK_MARK not in with_tools
    assert '"arguments": {"city": "Paris", "days": 1}' in with_tools
    assert not with_tools.startswith("(default)")
    # tool turns without tools ("none"): still the template that knows them
    assert "<tool_response>" in prompt(both, HISTORY, [WEATHER_TOOL], "none")
    assert not prompt(both, HISTORY, [WEATHER_TOOL], "none").startswith("(default)")
    assert prompt(both, HISTORY[:1], None, None) == "(default)<|im_start|>user\nweather in Paris?" \
                                                    "<|im_end|>\n<|im_start|>assistant\n"


def test_only_templates_that_write_calls_as_the_grammar_does_get_the_tools():
    """The template is rendered with a probe call: one that mentions <tool_call> and tools but
    writes calls otherwise (GLM's, MiniMax's, Qwen3-Coder's XML; here arguments that are not
    JSON) gets bchat's instructions, which describe the format the grammar holds a call to."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def style(template: str) -> str | None:
        formatter = Jinja2ChatFormatter(template=template, eos_token="", bos_token="")
        return template_tool_style(
            template, lambda messages, tools: formatter(messages=messages, tools=tools).prompt)

    assert style(HERMES_TOOLS_TEMPLATE) == "hermes"
    assert style(HERMES_TOOLS_TEMPLATE.replace("tool_call.arguments | tojson",
                                               "tool_call.arguments | string")) is None
    xml = HERMES_TOOLS_TEMPLATE.replace("""{"name": "' + tool_call.name""",
                                        """' + tool_call.name + '<arg_key>'""")
    assert xml != HERMES_TOOLS_TEMPLATE and style(xml) is None
    assert style(HERMES_TOOLS_TEMPLATE.replace("{{- tool | tojson }}", "")) is None  # unlisted
    assert style(CHATML_TEMPLATE) is None
    # Llama 3.1's bare {"name", "parameters"} object; not when it writes anything else there.
    assert style(LLAMA31_TEMPLATE) == "llama3"
    assert style(LLAMA31_TEMPLATE.replace("""'"parameters": '""", """'"args": '""")) is None
    assert style(LLAMA31_TEMPLATE.replace("tool_call.arguments | tojson",
                                          "tool_call.arguments | string")) is None


def test_llama3_calls_are_held_to_and_read_back_as_bare_json():
    grammar = build_grammar(None, [WEATHER_TOOL, TIME_TOOL], "auto", LLAMA3)
    assert "<tool_call>" not in grammar and '"\\"parameters\\""' in grammar
    call = '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    content, _, calls = split_reply(call, tools=True)
    assert content == "" and calls[0]["function"] == {"name": "get_weather",
                                                      "arguments": '{"city": "Rome"}'}
    # llama.cpp's optional "type" is read too; other JSON, or any without tools, is a reply.
    assert split_reply('{"type": "function", ' + call[1:], tools=True)[2][0]["function"]["name"] \
        == "get_weather"
    for text in ('{"name": "x", "parameters": {}, "also": 1}', '{"city": "Rome"}', "{"):
        assert split_reply(text, tools=True) == (text, None, None)
    assert split_reply(call, tools=False) == (call, None, None)

    # Streamed: a reply is held only while its start could still be a call.
    splitter = ReplySplitter(tools=True)
    assert splitter.feed('{ "na') == [] and splitter.feed('me": "get_time", ') == []
    assert splitter.feed('"parameters": {"zone": "UTC"}}') == []
    pieces, calls = splitter.finish()
    assert pieces == [] and calls[0]["function"]["arguments"] == '{"zone": "UTC"}'
    splitter = ReplySplitter(tools=True)
    assert splitter.feed("{") == [] and splitter.feed('"sky"') == [("content", '{"sky"')]
    assert splitter.feed(": 1}") == [("content", ": 1}")] and splitter.finish() == ([], None)


def test_a_tool_call_through_the_models_own_template(hermes_model, make_app, make_live_server):
    server = make_live_server(make_app(MODEL_PATH=str(hermes_model), **LOOSE))
    client = server.openai_client()
    model = client.models.list().data[0].id
    hermes = builder(hermes_model)
    user = HISTORY[:1]

    done = client.chat.completions.create(model=model, messages=user, max_tokens=120,
                                          tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    tool = WEATHER_TOOL if call.function.name == "get_weather" else TIME_TOOL
    jsonschema_rs.validator_for(tool["function"]["parameters"]).validate(
        json.loads(call.function.arguments))
    # The prompt the model read is the template's own rendering of the tools, token for token.
    assert done.usage.prompt_tokens == len(hermes.tokenize(
        prompt(hermes, user, [WEATHER_TOOL, TIME_TOOL], "required")))

    # Streamed, the history's call and result through the template, a named function.
    history = [*user, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
    deltas, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
            model=model, messages=history, max_tokens=120, stream=True,
            stream_options={"include_usage": True}, tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_time"}}):
        usage = chunk.usage or usage
        for streamed in chunk.choices:
            deltas.extend(streamed.delta.tool_calls or [])
            finish = streamed.finish_reason or finish
    assert finish == "tool_calls" and deltas[0].function.name == "get_time"
    assert json.loads(deltas[0].function.arguments)["zone"] in ("UTC", "CET")
    assert usage.prompt_tokens == len(hermes.tokenize(prompt(
        hermes, history, [WEATHER_TOOL, TIME_TOOL],
        {"type": "function", "function": {"name": "get_time"}})))


def test_llama31_template_renders_the_tools_itself(llama_model):
    llama = builder(llama_model)
    assert llama.tool_style == "llama3"
    text = prompt(llama, HISTORY, [WEATHER_TOOL, TIME_TOOL], "auto")
    # The template's own tools section: its instructions, each tool as indented JSON in
    # OpenAI's shape, in the first user message; the history's call as its bare object.
    first_user = text.split("<|start_header_id|>user<|end_header_id|>\n\n", 1)[1]
    assert first_user.startswith("Given the following functions")
    for tool in (WEATHER_TOOL, TIME_TOOL):
        assert json.dumps({"type": "function", "function": tool["function"]}, indent=4) in first_user
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", ' \
           '"parameters": {"city": "Paris", "days": 1}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>" in text
    assert FALLBACK_MARK not in text and "<tool_call>" not in text
    # today's date, as llama.cpp passes it, not the template's own default (26 Jul 2024)
    assert f"Today Date: {time.strftime('%d %b %Y')}" in text or \
        f"Today Date: {time.strftime('%d %b %Y', time.localtime(time.time() - 60))}" in text
    assert "Given the following functions" not in prompt(llama, HISTORY, [WEATHER_TOOL], "none")
    # Two calls in one message (another model's parallel calls), which this template refuses
    # ("only supports single tool-calls"): one turn each, then both results.
    calls = [{"id": f"call_{city}", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": city, "days": 1})}}
        for city in ("Paris", "Rome")]
    parallel = [HISTORY[0], {"role": "assistant", "content": None, "tool_calls": calls},
                *({"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in calls)]
    text = prompt(llama, parallel, [WEATHER_TOOL], "auto")
    turns = text.split("<|start_header_id|>")
    assert [t.split("<|end_header_id|>")[0] for t in turns[-5:]] == [
        "assistant", "assistant", "ipython", "ipython", "assistant"]
    assert [json.loads(t.split("\n\n", 1)[1].removesuffix("<|eot_id|>"))["parameters"]["city"]
            for t in turns[-5:-3]] == ["Paris", "Rome"]


# "process": the model's own process finds the template's format and builds its grammar.
@pytest.mark.parametrize("runner", ["inline", "process"])
def test_a_tool_call_through_llama31s_template(llama_model, make_app, make_live_server, runner):
    server = make_live_server(make_app(MODEL_PATH=str(llama_model), MODEL_RUNNER=runner, **LOOSE))
    visitor = server.session()  # owns the key, so it can read the stored reply back
    visitor.visit()
    status, body = visitor.json("POST", "/api/keys", {"name": "tests"})
    assert status == 201
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=body["token"], max_retries=0)
    model = client.models.list().data[0].id
    llama = builder(llama_model)
    user = HISTORY[:1]

    done = client.chat.completions.create(model=model, messages=user, max_tokens=120,
                                          tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    tool = WEATHER_TOOL if call.function.name == "get_weather" else TIME_TOOL
    jsonschema_rs.validator_for(tool["function"]["parameters"]).validate(
        json.loads(call.function.arguments))
    assert call.id.startswith("call_") and call.type == "function"
    assert done.usage.prompt_tokens == len(llama.tokenize(
        prompt(llama, user, [WEATHER_TOOL, TIME_TOOL], "required")))
    # The model wrote the call as Llama 3.1 does (the grammar of its template's format), not
    # in bchat's <tool_call> convention: the stored reply is the bare object.
    stored = visitor.json("GET", f"/api/conversations/{done.bchat['conversation_id']}")[1]
    written = stored["messages"][-1]["content"]
    assert json.loads(written) == {"name": call.function.name,
                                   "parameters": json.loads(call.function.arguments)}

    history = [*user, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
    deltas, finish, usage, content = [], None, None, ""
    for chunk in client.chat.completions.create(
            model=model, messages=history, max_tokens=120, stream=True,
            stream_options={"include_usage": True}, tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_time"}}):
        usage = chunk.usage or usage
        for streamed in chunk.choices:
            deltas.extend(streamed.delta.tool_calls or [])
            content += streamed.delta.content or ""
            finish = streamed.finish_reason or finish
    assert finish == "tool_calls" and content == "" and len(deltas) == 1
    assert deltas[0].function.name == "get_time" and deltas[0].id.startswith("call_")
    assert json.loads(deltas[0].function.arguments)["zone"] in ("UTC", "CET")
    assert usage.prompt_tokens == len(llama.tokenize(prompt(
        llama, history, [WEATHER_TOOL, TIME_TOOL],
        {"type": "function", "function": {"name": "get_time"}})))
