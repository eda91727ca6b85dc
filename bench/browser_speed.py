"""Speed of the bundled model in the page (wllama) against native llama-cpp-python, same threads.

For each format llama.cpp derives from the bundled SmolLM2 (Q4_1 as shipped, Q8_0, Q4_0, F16)
and each WASM backend (wasm-st: 1 thread, wasm-mt: 2), in Debian's chromium:
  - decode tok/s (greedy, --tokens tokens, EOS ignored) and prompt tok/s (--prompts tokens,
    no cache), with the load parameters pages use (engines/browser.js loadParams);
  - the same through llama-cpp-python with the same threads and file, and the ratios.
Then, through the real chat page with the format bchat serves (BCHAT_BROWSER_FORMAT):
  - first token on a first visit (empty browser storage) and on a cached reload, measured from
    navigation; the browser engine is already picked (it preloads on pick and on page load);
  - an 8-turn conversation written elsewhere, switched to the browser engine: how long reading
    its history takes, first token when Send comes after that, and when Send comes at once.
Each figure is the min / median of --runs runs. Prints figures; not a test.

    .venv/bin/python bench/browser_speed.py
    .venv/bin/python bench/browser_speed.py --formats Q8_0 --backends wasm-mt --prompts 100,500,2000
    .venv/bin/python bench/browser_speed.py --skip-formats          # only the chat-page figures
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

STORY = ("Write a long, detailed story about a dragon who learns to bake bread, with every step "
         "of the recipe, the village, the baker's family and the seasons. ")
BACKEND_THREADS = {"wasm-st": 1, "wasm-mt": 2}

# Measured in the page with wllama directly (the engine's own load parameters), so prompt and
# decode speed are separated from the chat's own round trips.
PAGE_JS = r"""
async ([cfg]) => {
  const { Wllama } = await import('/static/vendor/wllama/index.js');
  const { loadParams } = await import('/static/js/engines/browser.js');
  const quiet = { debug() {}, log() {}, warn() {}, error: console.error };
  const w = new Wllama({ default: '/static/vendor/wllama/wllama.wasm' }, { logger: quiet });
  const params = loadParams({ threads: cfg.threads });
  if (cfg.batch) Object.assign(params, { n_batch: cfg.batch, n_ubatch: cfg.batch });
  await w.loadModelFromUrl(cfg.url, params);
  const out = { threads: w.getNumThreads(), multithread: w.isMultithread(), prompts: [] };
  const last = async (options) => {
    let timings = null;
    for await (const c of await w.createCompletion({ ...options, stream: true })) {
      if (c.timings) timings = c.timings;
    }
    return timings;
  };
  const decode = await last({ prompt: cfg.story, max_tokens: cfg.tokens, temperature: 0,
                              ignore_eos: true, cache_prompt: false });
  out.decode = decode.predicted_per_second;
  out.decoded = decode.predicted_n;
  for (const prompt of cfg.prompts) {
    const t = await last({ prompt, max_tokens: 1, temperature: 0, cache_prompt: false });
    out.prompts.push({ n: t.prompt_n, per_second: t.prompt_per_second });
  }
  await w.exit();
  return out;
}
"""


def prompt_texts(model_path: str, sizes: list[int]) -> list[str]:
    """Texts of exactly ``sizes`` tokens (by the model's own tokenizer)."""
    from llama_cpp import Llama

    llm = Llama(model_path, vocab_only=True, verbose=False)
    words = " ".join(f"{i}. The quick brown fox jumps over the lazy dog near the river bank."
                     for i in range(max(sizes)))
    tokens = llm.tokenize(words.encode(), add_bos=False)
    return [llm.detokenize(tokens[:n]).decode(errors="ignore") for n in sizes]


def native(model_path: str, threads: int, tokens: int, prompts: list[str]) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path, n_ctx=4096, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    out = {"prompts": []}
    for text in prompts:
        ids = llm.tokenize(text.encode(), add_bos=False)
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        out["prompts"].append(len(ids) / (time.perf_counter() - started))
    llm.reset()
    llm.eval(llm.tokenize(STORY.encode()))
    started = time.perf_counter()
    for _ in range(tokens):  # greedy, EOS ignored: the same work as the page's decode
        llm.eval([llm.sample(temp=0)])
    out["decode"] = tokens / (time.perf_counter() - started)
    return out


def app_for(model_path: str, browser_format: str, browser_dir: str):
    from conftest import LiveServer, migrate

    from webapp import create_app

    tmp = tempfile.mkdtemp()
    url = f"sqlite:///{tmp}/bench.sqlite3"
    migrate(url)
    app = create_app({"DATABASE_URL": url, "MODEL_PATH": model_path, "SECRET_KEY": "bench",
                      "BROWSER_FORMAT": browser_format, "BROWSER_MODELS_DIR": browser_dir,
                      "N_THREADS": 2})
    return app, LiveServer(app)


def format_rows(args, browser_dir: str) -> list[dict]:
    from browser import chromium

    from webapp.catalogue import browser_file, read_model_file
    from webapp.files import browser_url

    original = read_model_file(Path(args.model))
    texts = prompt_texts(args.model, args.prompts)
    rows = []
    for fmt in args.formats:
        app, server = app_for(args.model, fmt, browser_dir)
        file = browser_file(original, fmt, Path(browser_dir))
        try:
            with app.test_request_context(base_url=server.url):
                served = app.extensions["bchat"].catalogue.browser(original.id)
                model_url = server.url + browser_url(original, served)
            with chromium([]) as context:
                page = context.new_page()
                page.goto(server.url + "/")
                for backend in args.backends:
                    threads = BACKEND_THREADS[backend]
                    runs = [page.evaluate(PAGE_JS, [{
                        "url": model_url, "threads": threads, "tokens": args.tokens,
                        "story": STORY, "prompts": texts, "batch": args.batch}])
                        for _ in range(args.runs)]
                    natives = [native(str(file.path), threads, args.tokens, texts)
                               for _ in range(args.runs)]
                    rows.append({"format": file.format, "backend": backend, "threads": threads,
                                 "multithread": runs[0]["multithread"],
                                 "decode": [r["decode"] for r in runs],
                                 "native_decode": [n["decode"] for n in natives],
                                 "prompts": [[r["prompts"][i]["per_second"] for r in runs]
                                             for i in range(len(texts))],
                                 "prompt_n": [runs[0]["prompts"][i]["n"] for i in range(len(texts))],
                                 "native_prompts": [[n["prompts"][i] for n in natives]
                                                    for i in range(len(texts))]})
                    print_row(rows[-1], args.prompts, header=len(rows) == 1, flush=True)
        finally:
            server.stop()
            app.extensions["bchat"].close()
    return rows


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}/{statistics.median(values):.1f}"


def print_row(row: dict, sizes: list[int], header: bool, flush: bool = False) -> None:
    if header:
        cols = "".join(f"{'prompt' + str(n):>14}{'native':>14}" for n in sizes)
        print(f"{'format':<6}{'backend':<9}{'thr':>4}{'decode':>12}{'native':>12}{'ratio':>7}{cols}"
              f"{'ratio':>7}   (tok/s, min/median; ratio = page/native medians)")
    ratio = statistics.median(row["decode"]) / statistics.median(row["native_decode"])
    cells = "".join(f"{spread(p):>14}{spread(n):>14}"
                    for p, n in zip(row["prompts"], row["native_prompts"], strict=True))
    last = statistics.median(row["prompts"][-1]) / statistics.median(row["native_prompts"][-1])
    print(f"{row['format']:<6}{row['backend']:<9}{row['threads']:>4}{spread(row['decode']):>12}"
          f"{spread(row['native_decode']):>12}{ratio:>7.2f}{cells}{last:>7.2f}", flush=flush)


def conversation(page, turns: int) -> str:
    """An ``turns``-message conversation stored through the API (as another engine wrote it)."""
    return page.evaluate("""async (turns) => {
      const post = (path, body) => fetch(path, { method: 'POST', body: JSON.stringify(body),
        headers: {'Content-Type': 'application/json'} }).then((r) => r.json());
      const c = await post('/api/conversations', { title: 'eight turns' });
      for (let i = 0; i < turns; i += 2) {
        await post(`/api/conversations/${c.id}/messages`, { role: 'user',
          content: `Question ${i / 2 + 1}: tell me about bread, ovens and flour in a few sentences.` });
        await post(`/api/conversations/${c.id}/messages`, { role: 'assistant', content:
          'Bread is made of flour, water, salt and yeast. The dough rises, is shaped, and bakes in a hot ' +
          'oven until the crust is brown. Bakers start early so the loaves are ready by morning, and ' +
          'every region has its own shapes, grains and traditions for the daily loaf.',
          provenance: { engine: 'browser', model: 'bench' } });
      }
      return c.id;
    }""", turns)


def first_token(page, text: str = "Say hello.") -> float:
    """Seconds from now to the first token of a reply to ``text`` (sent now)."""
    started = time.perf_counter()
    before = page.locator('[data-role="assistant"]').count()
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("composer").press("Enter")
    # A first visit's first message downloads the model: over 100 MiB the page asks first.
    page.wait_for_function(
        "(n) => document.querySelector('[data-testid=download-dialog]')"
        " || document.querySelectorAll('[data-role=assistant]')[n]", arg=before, timeout=900_000, polling=50)
    if page.get_by_test_id("download-dialog").count():
        page.get_by_test_id("download-dialog-confirm").click()
    page.wait_for_function(
        "(n) => (document.querySelectorAll('[data-role=assistant] .body')[n]?.innerText || '').trim()",
        arg=before, timeout=900_000, polling=50)
    elapsed = time.perf_counter() - started
    page.wait_for_function(
        "(n) => document.querySelectorAll('[data-role=assistant]')[n].dataset.status !== 'streaming'",
        arg=before, timeout=900_000)
    return elapsed


def page_rows(args, browser_dir: str) -> dict:
    from browser import chromium
    from playwright.sync_api import expect

    app, server = app_for(args.model, args.serve_format, browser_dir)
    results: dict[str, list[float]] = {"first visit": [], "cached reload": [],
                                       "8 turns: history read after switch": [],
                                       "8 turns: first token, Send after reading": [],
                                       "8 turns: first token, Send at switch": [],
                                       "8 turns: prompt tokens": []}

    def ready(page) -> None:
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        page.get_by_test_id("settings").locator("summary").click()
        page.get_by_test_id("max-tokens").fill("8")
        page.get_by_test_id("temperature").fill("0")
        page.get_by_test_id("settings").locator("summary").click()

    try:
        for _ in range(args.runs):
            with chromium([]) as context:  # a fresh profile: nothing in the browser's storage
                page = context.new_page()
                page.goto(server.url + "/")
                page.evaluate("localStorage.setItem('bchat.engine', 'browser');"
                              "localStorage.setItem('bchat.backend', 'wasm-mt')")
                started = time.perf_counter()
                page.reload()
                ready(page)
                results["first visit"].append(time.perf_counter() - started + first_token(page))
                started = time.perf_counter()
                page.reload()
                ready(page)
                results["cached reload"].append(time.perf_counter() - started + first_token(page))

                for send_at_once in (False, True):
                    page.evaluate("localStorage.setItem('bchat.engine', 'server')")
                    conversation_id = conversation(page, 8)
                    page.goto(f"{server.url}/c/{conversation_id}")
                    ready(page)
                    page.evaluate("""() => { window.statusLog = [];
                      const text = document.querySelector('[data-testid="browser-status-text"]');
                      new MutationObserver(() => window.statusLog.push(text.textContent))
                        .observe(text, {childList: true, characterData: true, subtree: true}); }""")
                    started = time.perf_counter()
                    page.get_by_test_id("engine-select").select_option("browser")
                    if send_at_once:
                        results["8 turns: first token, Send at switch"].append(first_token(page))
                    else:
                        page.wait_for_function("""() => {
                          const log = window.statusLog;
                          const read = log.findIndex((l) => l.startsWith('Reading the conversation'));
                          return read >= 0 && log.slice(read).some((l) => l.includes('runs in this browser'));
                        }""", timeout=900_000, polling=100)
                        results["8 turns: history read after switch"].append(time.perf_counter() - started)
                        results["8 turns: first token, Send after reading"].append(first_token(page))
                    reply = page.evaluate("async id => (await (await fetch("
                                          "`/api/conversations/${id}`)).json()).messages.at(-1)",
                                          conversation_id)
                    results["8 turns: prompt tokens"].append(reply["usage"]["prompt_tokens"])
    finally:
        server.stop()
        app.extensions["bchat"].close()
    return results


def main() -> None:
    from webapp.config import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--formats", default="Q4_1,Q8_0,Q4_0,F16", type=lambda s: s.split(","))
    parser.add_argument("--backends", default="wasm-st,wasm-mt", type=lambda s: s.split(","))
    parser.add_argument("--prompts", default="100,500,2000",
                        type=lambda s: [int(n) for n in s.split(",")])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None,
                        help="override the page's n_batch/n_ubatch (to measure their effect)")
    parser.add_argument("--serve-format", default="Q8_0", help="BCHAT_BROWSER_FORMAT for the chat page")
    parser.add_argument("--skip-formats", action="store_true")
    parser.add_argument("--skip-page", action="store_true")
    args = parser.parse_args()
    browser_dir = tempfile.mkdtemp(prefix="bchat-browser-models-")
    print(f"model {Path(args.model).name}; {args.runs} runs each; this machine may be shared, "
          "so figures are min/median", flush=True)
    if not args.skip_formats:
        format_rows(args, browser_dir)
    if not args.skip_page:
        print(f"\nchat page, format {args.serve_format}, wasm-mt (seconds, min/median):")
        for name, values in page_rows(args, browser_dir).items():
            print(f"  {name:<44}{spread(values):>14}")


if __name__ == "__main__":
    main()
