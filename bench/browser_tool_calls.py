"""Does the page's llama.cpp (vendored wllama) return tool calls for the bundled SmolLM2?

The browser engine could run bchat's tool loop in the page only if wllama's
``createChatCompletion({tools, tool_choice})`` gave llama.cpp's own grammar-constrained
``tool_calls`` back, as llama-server does. This asks it, in Debian's chromium, three ways:

  stock      the model's own chat template (SmolLM2's has no tools section), jinja on;
  hermes     the same model loaded with a ChatML template that has a Hermes/Qwen2.5-style tools
             section (``chat_template`` load parameter), the format bchat's server loop uses;
  schema     no tools: ``response_format`` json_schema of one calculator call, to tell "the wasm
             has no grammar" apart from "the tool path builds none";
  served     what the browser engine does now (webapp/tools/steps.py): the server's tool
             instructions in the system prompt and its GBNF grammar (the real calculator,
             tool_choice "required") as wllama's ``grammar``; the reply read back with the
             server's parser.

Prints, for each: finish_reason, tool_calls (or none), prompt tokens and the text. Not a test.
Measured with wllama 3.13 (2026-12-07): stock and hermes gave plain, unconstrained text and no
tool_calls (hermes's prompt did carry the tools: 202 tokens against 39); schema's output was
constrained to the schema. So llama.cpp's tool path in this build builds no grammar for this
model; the browser engine instead passes the server's own tool grammar (GBNF) as wllama's
``grammar`` parameter, which the wasm holds replies to as it holds a schema (webapp/tools/steps.py,
tests/test_browser_engine_tools.py). Measured so (served, 2026-12-07, 194 prompt tokens): SmolLM2
wrote ``<tool_call>{"name":"calculator", "arguments":{"expression":"17*23"}}</tool_call>``,
which the server's parser reads as one call.

    PYTHONPATH=$PWD .venv/bin/python bench/browser_tool_calls.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# ChatML as SmolLM2 writes it, plus the Hermes tools section and tool turns (as Qwen2.5's).
HERMES = (Path(__file__).parent / "browser_tool_calls.jinja").read_text()

PAGE_JS = r"""
async ([url, hermes, served]) => {
  const { Wllama } = await import('/static/vendor/wllama/index.js');
  const { loadParams } = await import('/static/js/engines/browser.js');
  const quiet = { debug() {}, log() {}, warn() {}, error: console.error };
  const calculator = { type: 'function', function: { name: 'calculator',
    description: 'Evaluate an arithmetic expression',
    parameters: { type: 'object', properties: { expression: { type: 'string' } },
                  required: ['expression'] } } };
  const ask = { messages: [{ role: 'user', content: 'What is 17*23?' }], stream: false,
                max_tokens: 64, temperature: 0 };
  const pick = (r) => ({ finish_reason: r.choices[0].finish_reason,
                         tool_calls: r.choices[0].message.tool_calls ?? null,
                         prompt_tokens: r.usage?.prompt_tokens,
                         content: r.choices[0].message.content });
  const out = {};
  for (const [name, template] of [['stock', null], ['hermes', hermes]]) {
    const w = new Wllama({ default: '/static/vendor/wllama/wllama.wasm' }, { logger: quiet });
    await w.loadModelFromUrl(url, { ...loadParams({ threads: 2 }), jinja: true,
                                    ...(template ? { chat_template: template } : {}) });
    out[name] = pick(await w.createChatCompletion({ ...ask, tools: [calculator], tool_choice: 'required' }));
    if (name === 'stock') {
      const schema = { type: 'object', required: ['name', 'arguments'], properties: {
        name: { const: 'calculator' }, arguments: calculator.function.parameters } };
      out.schema = pick(await w.createChatCompletion({ ...ask,
        response_format: { type: 'json_schema', json_schema: { name: 'call', schema } } }));
      out.served = pick(await w.createChatCompletion({ ...ask, grammar: served.grammar,
        messages: [{ role: 'system', content: served.instructions }, ...ask.messages] }));
    }
    await w.exit();
  }
  return out;
}
"""


def main() -> None:
    from browser import chromium
    from conftest import LiveServer, bundled_model_path, migrate

    from webapp import create_app
    from webapp.engines.structured import build_grammar, parse_tool_calls, tool_instructions
    from webapp.tools import build_tools

    tmp = Path(tempfile.mkdtemp(prefix="bchat-tool-probe-"))
    url = f"sqlite:///{tmp / 'probe.sqlite3'}"
    migrate(url)
    app = create_app({"DATABASE_URL": url, "MODEL_PATH": str(bundled_model_path()),
                      "SECRET_KEY": "probe", "N_THREADS": 1})
    live = LiveServer(app)
    registry = build_tools({})
    specs = registry.specs(registry.enabled(["calculator"]))
    served = {"grammar": build_grammar(None, specs, "required"),
              "instructions": tool_instructions(specs, "required")}
    try:
        with chromium([]) as context:
            page = context.new_page()
            page.goto(live.url + "/")
            models = page.evaluate("async () => (await (await fetch('/api/models')).json())")
            entry = next(m for m in (models.get("models", models) if isinstance(models, dict) else models)
                         if m.get("browser"))
            result = page.evaluate(PAGE_JS, [live.url + entry["browser"]["url"], HERMES, served])
    finally:
        live.stop()
        app.extensions["bchat"].close()
    result["served"]["parsed_calls"] = parse_tool_calls(result["served"]["content"] or "")
    for name, answer in result.items():
        print(f"{name}: {json.dumps(answer, ensure_ascii=False)}")


if __name__ == "__main__":
    main()
