"""Which llama.cpp build to install: prompt and decode tok/s of each candidate, side by side.

Each candidate is a llama-cpp-python wheel built with other CMAKE_ARGS (built here once and
kept in ~/.cache/bchat/bench-builds/, ~5-10 minutes each on 2 cores), run in a child process
of its own through LLAMA_CPP_LIB_PATH, so a build that crashes on this CPU is a row of the
table (with its signal), not the end of the script:

- native:            -DGGML_NATIVE=ON (what pip builds by default: -march=native)
- native, AMX off:   the same libraries, model loaded with use_extra_bufts=false (no AMX or
                     repacked weight buffers; a llama_model_params field, not a Llama() keyword)
- native, AMX fixed: -DGGML_NATIVE=ON from a source whose AMX tile configuration is loaded
                     with all 64 bytes named (see --patched-source; GCC 12's _tile_loadconfig
                     names 8, so the compiler drops the rest of the configuration)
- portable:          -DGGML_NATIVE=OFF (AVX2/FMA/F16C; what scripts/setup installs)
- all variants:      -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON (llama.cpp's releases:
                     one libggml-cpu per CPU family, picked at run time)

    .venv/bin/python bench/llama_builds.py [--model PATH] [--threads N] [--runs 3]
        [--only NAME ...] [--patched-source DIR]

Run it on an idle machine: every figure is CPU time shared with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bchat" / "bench-builds"
LLAMA_VERSION = next(line.split("==")[1].strip()
                     for line in (ROOT / "constraints.txt").read_text().splitlines()
                     if line.lower().startswith(("llama_cpp_python==", "llama-cpp-python==")))
PROMPT_TOKENS = 480
DECODE_TOKENS = 128

# name -> (CMAKE_ARGS, build folder, load the model with use_extra_bufts)
CANDIDATES = {
    "native": ("-DGGML_NATIVE=ON", "native", True),
    "native, AMX off": ("-DGGML_NATIVE=ON", "native", False),
    "native, AMX fixed": ("-DGGML_NATIVE=ON", "native-patched", True),
    "portable (setup)": ("-DGGML_NATIVE=OFF", "portable", True),
    "all variants": ("-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON", "variants", True),
}


def build(folder: str, cmake_args: str, source: str | None) -> Path:
    """The candidate's wheel, unpacked (built once); returns the folder holding llama_cpp/."""
    target = CACHE / f"{LLAMA_VERSION}-{folder}"
    if (target / "llama_cpp" / "lib").is_dir():
        return target
    wheels = CACHE / f"{LLAMA_VERSION}-{folder}.wheel"
    if not list(wheels.glob("*.whl")):
        what = source or f"llama-cpp-python=={LLAMA_VERSION}"
        print(f"building {folder} ({cmake_args}) from {what}: several minutes", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-cache-dir", "--no-deps",
                        "--no-binary", "llama-cpp-python", "-w", str(wheels), what],
                       env={**os.environ, "CMAKE_ARGS": cmake_args}, check=True)
    with zipfile.ZipFile(next(wheels.glob("*.whl"))) as wheel:
        wheel.extractall(target)
    return target


CHILD = r"""
import ctypes, json, os, statistics, sys, time
site, model, threads, extra_bufts, runs, prompt_n, decode_n = sys.argv[1:8]
sys.path.insert(0, site)
import llama_cpp
lib = os.path.join(site, "llama_cpp", "lib")
variants = os.path.join(site, "bin")
if os.path.isdir(variants):  # GGML_BACKEND_DL: llama-cpp-python does not look in bin/ itself
    ggml = ctypes.CDLL(os.path.join(lib, "libggml.so"))
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path(variants.encode())
if extra_bufts == "0":  # Llama() reads its defaults from llama_cpp.llama_cpp, then loads
    import llama_cpp.llama_cpp as low
    default = low.llama_model_default_params
    def without_extra_bufts():
        params = default()
        params.use_extra_bufts = False
        return params
    low.llama_model_default_params = without_extra_bufts
info = llama_cpp.llama_print_system_info().decode()
from llama_cpp import Llama
llm = Llama(model, n_ctx=2048, n_threads=int(threads), n_threads_batch=int(threads), n_batch=512,
            verbose=False)
words = ("the quick brown fox jumps over the lazy dog while a model reads every word " * 64).split()
prompt = llm.tokenize(" ".join(words).encode())[: int(prompt_n)]
rows = []
for _ in range(int(runs) + 1):
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    n = 0
    while n < int(decode_n):  # one token at a time, as a chat decodes
        llm.eval([llm.sample(temp=0.0)])
        n += 1
    decode_s = time.perf_counter() - start
    rows.append((len(prompt) / prompt_s, n / decode_s))
rows = rows[1:]
print(json.dumps({"prompt": statistics.median(r[0] for r in rows),
                  "decode": statistics.median(r[1] for r in rows), "info": info}))
"""


def measure(site: Path, model: str, threads: int, extra_bufts: bool, runs: int) -> dict:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(site / "llama_cpp" / "lib")}
    done = subprocess.run([sys.executable, "-c", CHILD, str(site), model, str(threads),
                           "1" if extra_bufts else "0", str(runs), str(PROMPT_TOKENS), str(DECODE_TOKENS)],
                          env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode < 0:
        return {"crash": signal.Signals(-done.returncode).name}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from webapp.config import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", action="append", help="candidate names to run (default: all)")
    parser.add_argument("--patched-source", help="an unpacked llama-cpp-python sdist whose "
                        "ggml/src/ggml-cpu/amx/mmq.cpp loads the tile configuration with "
                        "asm(\"ldtilecfg %%0\" :: \"m\"(tc)); without it that row is skipped")
    args = parser.parse_args()

    cpu_flags = ""
    try:
        cpu_flags = " ".join(sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                                     if f.startswith(("avx512f", "amx", "avx2"))}))
    except OSError:
        pass
    print(f"llama-cpp-python {LLAMA_VERSION}, {Path(args.model).name}, {args.threads} threads, "
          f"prompt {PROMPT_TOKENS} tokens, decode {DECODE_TOKENS}, median of {args.runs}")
    print(f"CPU flags: {cpu_flags or '?'}")
    print(f"{'build':<20}{'prompt tok/s':>14}{'decode tok/s':>14}  result")
    for name, (cmake_args, folder, extra_bufts) in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        source = None
        if folder == "native-patched":
            if not args.patched_source:
                print(f"{name:<20}{'-':>14}{'-':>14}  skipped (no --patched-source)")
                continue
            source = args.patched_source
        try:
            site = build(folder, cmake_args, source)
        except subprocess.CalledProcessError as err:
            print(f"{name:<20}{'-':>14}{'-':>14}  build failed ({err.returncode})")
            continue
        result = measure(site, args.model, args.threads, extra_bufts, args.runs)
        if "crash" in result:
            print(f"{name:<20}{'-':>14}{'-':>14}  CRASHED with {result['crash']}")
        elif "error" in result:
            print(f"{name:<20}{'-':>14}{'-':>14}  failed: {result['error']}")
        else:
            amx = "AMX_INT8 = 1" in result["info"]
            print(f"{name:<20}{result['prompt']:>14.1f}{result['decode']:>14.1f}  ok"
                  f"{' (AMX compiled in)' if amx else ''}")


if __name__ == "__main__":
    main()
