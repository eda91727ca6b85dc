"""How long a model process takes to be noticed dead and to answer again after a crash.

Starts a supervisor with one runner (the bundled model by default), then ``--kills`` times:
streams a reply, kills the runner mid-reply (SIGKILL or SIGSEGV), and measures
- reply failed: from the kill to the reply's ``model_crashed`` error (what the user waits);
- first token of the next chat, sent right after the error: from the kill to the restarted
  runner's first token (back-off, process start, model load, prompt).

    .venv/bin/python bench/runner_restart.py [--model PATH] [--kills 5] [--signal SIGSEGV]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from webapp.catalogue import ModelCatalogue
    from webapp.config import bundled_model_path
    from webapp.engines.base import EngineError, Token
    from webapp.engines.runner import RunnerEngine
    from webapp.model_runner import start_supervisor
    from webapp.options import GenerationOptions

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--signal", default="SIGKILL", choices=["SIGKILL", "SIGSEGV", "SIGILL"])
    args = parser.parse_args()
    sig = signal.Signals[args.signal]
    catalogue = ModelCatalogue(args.model)
    model = catalogue.default_id
    config = {"N_CTX": 2048, "N_THREADS": os.cpu_count() or 1,
              "PARALLEL": 4, "RUNNER_NICE": 10, "WATCHDOG_SECONDS": 120}
    supervisor = start_supervisor(config, catalogue)
    engine = RunnerEngine(catalogue, supervisor.directory, supervisor)
    options = GenerationOptions(max_tokens=2000, temperature=0)
    failed, first = [], []
    try:
        for _ in range(args.kills):
            record = engine.state.wait(model, lambda r: r["status"] == "ready", 120)
            stream = engine.stream(model, [{"role": "user", "content": "Tell a long story."}],
                                   options, threading.Event())
            next(c for c in stream if isinstance(c, Token))
            killed = time.perf_counter()
            os.kill(record["pid"], sig)
            try:
                for _chunk in stream:
                    pass
            except EngineError as exc:
                assert exc.code == "model_crashed", exc.code
            failed.append(time.perf_counter() - killed)
            again = engine.stream(model, [{"role": "user", "content": "Hi"}],
                                  GenerationOptions(max_tokens=4, temperature=0), threading.Event())
            next(c for c in again if isinstance(c, Token))
            first.append(time.perf_counter() - killed)
            for _chunk in again:
                pass
    finally:
        supervisor.stop()
    print(f"{Path(args.model).name}, {args.kills} kills with {args.signal}, median (max):")
    for name, values in (("reply failed after the kill", failed),
                         ("first token of the next chat", first)):
        print(f"  {name:<30} {statistics.median(values) * 1000:8.0f} ms ({max(values) * 1000:.0f})")


if __name__ == "__main__":
    main()
