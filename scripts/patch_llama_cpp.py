"""Fix llama.cpp's AMX tile configuration in an unpacked llama-cpp-python source, before building.

    python scripts/patch_llama_cpp.py SOURCE_DIR

GCC 12's ``_tile_loadconfig`` (amxtileintrin.h) tells the compiler that ``ldtilecfg`` reads
8 bytes: ``"m" (*((const void **)__config))``. The tile configuration is 64 bytes, so GCC
drops the stores to the rows and columns of ``ggml_tile_config_init``'s config as dead, and
``ldtilecfg`` loads stack garbage: #GP (SIGSEGV) or, when the garbage is a valid but wrong
configuration, #UD on the first tile instruction (SIGILL). That is the crash of a native build
on CPUs with AMX (``ggml_backend_amx_mul_mat``, the first reply). Naming the whole struct as the
operand makes every byte live. Idempotent; fails loudly if the source is not the one expected.
"""

from __future__ import annotations

import sys
from pathlib import Path

FILE = "vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp"
BEFORE = """    _tile_loadconfig(&tc);
    done = true;"""
AFTER = """    // bchat: GCC 12's _tile_loadconfig names 8 of these 64 bytes as read, so the stores above
    // were dropped as dead and ldtilecfg loaded garbage (SIGSEGV/SIGILL). Name all of them.
    __asm__ volatile ("ldtilecfg %0" :: "m" (tc));
    done = true;"""


def patch(source: Path) -> str:
    path = source / FILE
    text = path.read_text()
    if AFTER in text:
        return "already patched"
    if text.count(BEFORE) != 1:
        raise SystemExit(f"{path}: the AMX tile configuration code is not where bchat expects it; "
                         "update scripts/patch_llama_cpp.py for this llama-cpp-python version")
    path.write_text(text.replace(BEFORE, AFTER))
    return "patched"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(f"llama.cpp AMX tile configuration: {patch(Path(sys.argv[1]))}")
