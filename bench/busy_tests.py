"""The timing-sensitive test files on a busy machine: four CPU-bound processes run beside them.

A submission must not fail for a neighbour's load. This starts ``--burners`` processes that
spin on the CPU (default 4, on a 2-core machine a load of ~6 with pytest), runs the given test
files (default: the ones that order events across threads and processes), and prints how each
file did and how long it took, then the machine's load average.

    .venv/bin/python bench/busy_tests.py [--burners 4] [--rounds 1] [FILE ...]

Exit status: 0 when every round of every file passed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time

DEFAULT_FILES = ["tests/test_batching.py", "tests/test_socket.py", "tests/test_durability.py",
                 "tests/test_runs.py"]


def burn(stop: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 31 + 7) % 1_000_003


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burners", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("files", nargs="*", default=DEFAULT_FILES)
    args = parser.parse_args()
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=burn, args=(stop,), daemon=True)
               for _ in range(args.burners)]
    for p in burners:
        p.start()
    failed = 0
    try:
        for round_ in range(1, args.rounds + 1):
            for path in args.files:
                began = time.perf_counter()
                result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                         path], capture_output=True, text=True)
                summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
                failed += result.returncode != 0
                print(f"round {round_}  {path:<28} {time.perf_counter() - began:6.1f} s  "
                      f"load {os.getloadavg()[0]:4.1f}  {summary}", flush=True)
                if result.returncode != 0:
                    print(result.stdout[-4000:], result.stderr[-2000:], sep="\n")
    finally:
        stop.set()
        for p in burners:
            p.join(5)
    print(f"{args.burners} CPU-bound processes beside; {failed} file run(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
