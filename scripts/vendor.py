#!/usr/bin/env python3
"""Refresh the browser libraries under webapp/static/vendor/ from the npm registry.

Each package is fetched with `npm pack NAME@VERSION` (pinned below), only the files the page
uses are copied, together with the package's licence, and webapp/static/vendor/manifest.json records
version, tarball integrity and a sha256 of every copied file. Run it after changing a pin;
commit what it writes. Nothing here runs at app start or in the browser.

Packages only the tests use (axe-core) go under tests/vendor/, outside what the app serves,
and are marked "test_only" in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "webapp" / "static" / "vendor"
TEST_VENDOR = ROOT / "tests" / "vendor"

# package -> (version, target folder, {file in package: file in folder}); a source with a "*"
# is a glob whose matches go into the folder its target names (ending in "/").
PACKAGES: dict[str, tuple[str, str, dict[str, str]]] = {
    "marked": ("18.2.1", "marked", {"lib/marked.esm.js": "marked.esm.js"}),
    "dompurify": ("3.4.18", "dompurify", {"dist/purify.es.mjs": "purify.es.mjs"}),
    # Its token colours come from webapp/static/css/app.css, so they follow the page's theme.
    "@highlightjs/cdn-assets": ("11.12.0", "highlight", {"es/highlight.min.js": "highlight.min.js"}),
    # llama.cpp in WebAssembly (one wasm for single-thread, multi-thread and WebGPU).
    "@wllama/wllama": (
        "3.13.0",
        "wllama",
        {"esm/index.js": "index.js", "esm/wasm/wllama.wasm": "wllama.wasm"},
    ),
    # For browsers without JSPI or Memory64 (Safari, older Firefox). Served from here so that
    # wllama never falls back to its default of fetching these from a public CDN.
    "@wllama/wllama-compat": (
        "3.13.0",
        "wllama-compat",
        {"wasm/wllama.js": "wllama.js", "wasm/wllama.wasm": "wllama.wasm"},
    ),
    # TeX math, laid out by KaTeX's HTML with its own CSS and fonts (browsers' MathML has no
    # math font to draw an integral or a radical with). The module, the stylesheet and the
    # fonts are all loaded on the first message that has math in it. Only the woff2 fonts:
    # every browser the page runs in reads woff2 (see pin_font_urls).
    "katex": ("0.19.1", "katex", {
        "dist/katex.mjs": "katex.mjs",
        "dist/fonts/*.woff2": "fonts/",
        "dist/katex.min.css": "katex.min.css",
    }),
}
# Test-only: accessibility checks in the browser tests; never served by the app.
TEST_PACKAGES: dict[str, tuple[str, str, dict[str, str]]] = {
    "axe-core": ("4.14.1", "axe-core", {"axe.min.js": "axe.min.js"}),
}
LICENSE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "license")
# Packages that ship no licence file of their own: (licence, where the text comes from).
LICENSE_FROM = {"@wllama/wllama-compat": "@wllama/wllama"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_FONT_SRC = re.compile(r"src:([^;}]*)")
_WOFF2 = re.compile(r"url\((fonts/[^)]+\.woff2)\)\s*format\([\"']woff2[\"']\)")


def pin_font_urls(css_path: Path) -> None:
    """Each @font-face keeps only its woff2 source (the woff and ttf are not vendored), at
    ``?v=<the file's hash>``: the same version webapp/assets.py gives it, so the fonts are
    cached for good like everything else the page loads, with no request on a later visit."""
    def pinned(match: re.Match) -> str:
        woff2 = _WOFF2.search(match.group(1))
        if woff2 is None:
            raise SystemExit(f"{css_path}: a @font-face without a woff2 source: {match.group(0)[:80]}")
        version = sha256(css_path.parent / woff2.group(1))[:12]
        return f'src:url({woff2.group(1)}?v={version}) format("woff2")'

    css_path.write_text(_FONT_SRC.sub(pinned, css_path.read_text()))


# Changes made to a package's files after copying them, before their hashes are recorded.
AFTER_COPY = {"katex": lambda target: pin_font_urls(target / "katex.min.css")}


def fetch(name: str, version: str, workdir: Path) -> tuple[Path, dict]:
    out = subprocess.run(
        ["npm", "pack", f"{name}@{version}", "--json", "--pack-destination", str(workdir)],
        check=True, capture_output=True, text=True, cwd=workdir,
    )
    info = json.loads(out.stdout)[0]
    tarball = workdir / info["filename"]
    unpack = workdir / info["filename"].removesuffix(".tgz")
    with tarfile.open(tarball) as tar:
        tar.extractall(unpack, filter="data")
    return unpack / "package", info


def main() -> int:
    manifest: dict[str, dict] = {}
    everything = [(name, pin, VENDOR) for name, pin in PACKAGES.items()]
    everything += [(name, pin, TEST_VENDOR) for name, pin in TEST_PACKAGES.items()]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, folder, files), root in everything:
            package_dir, info = fetch(name, version, Path(tmp))
            target = root / folder
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            written = []
            for source, dest in files.items():
                matches = sorted(package_dir.glob(source)) if "*" in source else [package_dir / source]
                if not matches:
                    print(f"{name}: nothing matches {source}", file=sys.stderr)
                    return 1
                for path in matches:
                    out = target / dest / path.name if dest.endswith("/") else target / dest
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, out)
                    written.append(out)
            if name in AFTER_COPY:
                AFTER_COPY[name](target)
            copied = {out.relative_to(target).as_posix(): sha256(out) for out in written}
            licence_dir = package_dir
            if name in LICENSE_FROM:  # same project and licence (MIT), published without the file
                version_from = PACKAGES[LICENSE_FROM[name]][0]
                licence_dir, _ = fetch(LICENSE_FROM[name], version_from, Path(tmp))
            licence = next((licence_dir / n for n in LICENSE_NAMES if (licence_dir / n).exists()), None)
            if licence is None:
                print(f"{name}: no licence file in the package", file=sys.stderr)
                return 1
            shutil.copyfile(licence, target / "LICENSE")
            manifest[name] = {
                "version": version,
                "folder": folder,
                "integrity": info.get("integrity"),
                "files": copied,
            }
            if root is TEST_VENDOR:
                manifest[name]["test_only"] = True
                manifest[name]["folder"] = f"tests/vendor/{folder}"
            print(f"{name}@{version} -> {target.relative_to(ROOT)}")
    (VENDOR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
