"""Tokens/s of the bundled model in the page (wllama) vs native llama-cpp-python, same threads.

Runs bchat with the bundled SmolLM2, drives Debian's chromium through the real chat page with
the browser engine on each backend, reads the stored replies' decode speed, and runs the same
prompt through llama-cpp-python with the same thread count. Greedy, 64 tokens, median of runs.

    .venv/bin/python bench/browser_speed.py                 # wasm-st and wasm-mt (and webgpu if usable)
    .venv/bin/python bench/browser_speed.py --gpu           # on a machine with a real GPU:
                                                            # chromium flags for WebGPU on Vulkan
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

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."
GPU_FLAGS = ["--enable-unsafe-webgpu", "--enable-features=Vulkan,VulkanFromANGLE",
             "--use-angle=vulkan", "--ignore-gpu-blocklist"]


def in_browser(model_path: str, backends: list[str], tokens: int, runs: int, flags: list[str]):
    from browser import chromium
    from conftest import LiveServer, migrate
    from playwright.sync_api import expect

    from webapp import create_app

    tmp = tempfile.mkdtemp()
    url = f"sqlite:///{tmp}/bench.sqlite3"
    migrate(url)
    app = create_app({"DATABASE_URL": url, "MODEL_PATH": model_path, "SECRET_KEY": "bench"})
    server = LiveServer(app)
    results: dict[str, dict] = {}
    try:
        with chromium(flags) as context:
            for backend in backends:
                page = context.new_page()
                page.goto(server.url + "/")
                expect(page.get_by_test_id("connection")).to_have_text("connected")
                gpu = page.evaluate("""async () => {
                    const m = await import('/static/js/engines/browser.js');
                    return m.detectWebGPU();
                }""")
                if backend == "webgpu" and not gpu["usable"]:
                    results[backend] = {"skipped": gpu["reason"]}
                    page.close()
                    continue
                page.get_by_test_id("engine-select").select_option("browser")
                page.get_by_test_id("backend-select").select_option(backend)
                page.get_by_test_id("settings").locator("summary").click()
                page.get_by_test_id("max-tokens").fill(str(tokens))
                page.get_by_test_id("temperature").fill("0")
                page.get_by_test_id("settings").locator("summary").click()
                speeds, counts, threads = [], [], None
                for i in range(runs + 1):  # the first run loads the model
                    page.get_by_test_id("new-chat").click()
                    page.get_by_test_id("composer").fill(PROMPT)
                    page.get_by_test_id("composer").press("Enter")
                    reply = page.locator('[data-role="assistant"]').first
                    expect(reply).to_have_attribute("data-status", "complete", timeout=600_000)
                    conversation_id = page.url.rsplit("/c/", 1)[1]
                    message = page.evaluate(
                        "async id => (await (await fetch(`/api/conversations/${id}`)).json())"
                        ".messages[1]", conversation_id)
                    if message["backend"] != backend and backend != "auto":
                        raise RuntimeError(f"asked for {backend}, ran {message['backend']}")
                    threads = message["meta"].get("threads")
                    if i:
                        speeds.append(message["tokens_per_second"])
                        counts.append(message["usage"]["completion_tokens"])
                results[backend] = {"tok_s": statistics.median(speeds),
                                    "tokens": statistics.median(counts), "threads": threads}
                page.close()
    finally:
        server.stop()
        app.extensions["bchat"].close()
    return results


def native(model_path: str, threads: int, tokens: int, runs: int) -> float:
    from llama_cpp import Llama

    llama = Llama(model_path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    speeds = []
    for i in range(runs + 1):
        llama.reset()
        first = last = None
        n = 0
        for chunk in llama.create_chat_completion(
            [{"role": "user", "content": PROMPT}], temperature=0, max_tokens=tokens, stream=True
        ):
            if chunk["choices"][0]["delta"].get("content"):
                n += 1
                last = time.perf_counter()
                first = first or last
        if i:
            speeds.append((n - 1) / (last - first))
    return statistics.median(speeds)


def main() -> None:
    from webapp.config import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="chromium flags for WebGPU on a GPU host")
    args = parser.parse_args()
    flags = GPU_FLAGS if args.gpu else ["--enable-unsafe-webgpu"]
    page = in_browser(args.model, ["wasm-st", "wasm-mt", "webgpu"], args.tokens, args.runs, flags)
    print(f"model {Path(args.model).name}, greedy, {args.tokens} tokens, median of {args.runs}")
    print(f"{'backend':<10}{'threads':>8}{'page tok/s':>12}{'native tok/s':>14}{'page/native':>13}")
    for backend, row in page.items():
        if "skipped" in row:
            print(f"{backend:<10}  not usable here: {row['skipped']}")
            continue
        threads = row["threads"] or 1
        base = native(args.model, threads, args.tokens, args.runs)
        print(f"{backend:<10}{threads:>8}{row['tok_s']:>12.1f}{base:>14.1f}"
              f"{row['tok_s'] / base:>13.2f}")


if __name__ == "__main__":
    main()
