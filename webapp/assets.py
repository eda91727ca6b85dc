"""How the pages' static files travel: ``static_url()`` gives versioned URLs (``?v=`` a hash
of the file) that browsers may keep for a year, ``import_map()`` points every module's plain URL
at its versioned one (so the ES modules' own relative imports land on versioned URLs too, with
no bundler and no build step), ``module_graph()`` the modules to preload, and text assets go out
gzip-compressed (compressed once per file version, kept in memory). Anything fetched by a plain
URL (the wasm, fonts without a version) revalidates: a 304 whether it went out gzipped or not.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import threading
from pathlib import Path

from flask import Blueprint, Response, current_app, request, url_for
from markupsafe import Markup
from werkzeug.security import safe_join

from .security import allow_inline_script

bp = Blueprint("assets", __name__)

_lock = threading.Lock()
_versions: dict[str, tuple[int, int, str]] = {}  # path -> (mtime_ns, size, hash)
_compressed: dict[tuple[str, int, int], bytes] = {}
COMPRESSIBLE = {"text/css", "text/javascript", "application/javascript", "application/json",
                "image/svg+xml", "text/plain", "text/markdown", "text/html"}
MIN_COMPRESS_BYTES = 1024
YEAR = 365 * 24 * 3600


def _static_path(filename: str) -> Path | None:
    joined = safe_join(current_app.static_folder or "", filename)
    path = Path(joined) if joined else None
    return path if path and path.is_file() else None


def file_version(filename: str) -> str | None:
    """A short hash of a static file's bytes, recomputed only when the file changes."""
    path = _static_path(filename)
    if path is None:
        return None
    stat = path.stat()
    with _lock:
        known = _versions.get(str(path))
    if known and known[:2] == (stat.st_mtime_ns, stat.st_size):
        return known[2]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    with _lock:
        _versions[str(path)] = (stat.st_mtime_ns, stat.st_size, digest)
    return digest


@bp.app_template_global()
def static_url(filename: str) -> str:
    """url_for('static') plus ?v=<hash of the file>: a new file is a new URL."""
    version = file_version(filename)
    if version is None:
        return url_for("static", filename=filename)
    return url_for("static", filename=filename, v=version)


# What the import map covers: ES modules, and stylesheets a module adds itself (KaTeX's, found
# with import.meta.resolve, which applies the map to any URL).
MAPPED_SUFFIXES = (".js", ".mjs", ".css")


@bp.app_template_global()
def import_map() -> Markup:
    """``<script type="importmap">`` mapping each module's plain URL to its ``?v=`` URL.

    A module's ``import "./x.js"`` resolves to /static/js/x.js, which the browser looks up in
    the map before fetching: every module is fetched by a URL that names its bytes, cached for
    a year, and a changed file changes only its own URL. The CSP allows this one inline script
    by its hash. It must come before any module script or modulepreload in the page."""
    root = Path(current_app.static_folder or "")
    imports = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in MAPPED_SUFFIXES and path.is_file():
            name = path.relative_to(root).as_posix()
            imports[url_for("static", filename=name)] = static_url(name)
    # "<" escaped: the text sits inside a <script> element, and "</script>" would end it.
    text = json.dumps({"imports": imports}, separators=(",", ":")).replace("<", "\\u003c")
    allow_inline_script(text)
    return Markup(f'<script type="importmap">{text}</script>')


_STATIC_IMPORT = re.compile(r"""^\s*(?:import|export)\b[^;'"]*?(?:from\s*)?["']([^"']+)["']""", re.MULTILINE)


@bp.app_template_global()
def module_graph(entry: str) -> list[str]:
    """Every module ``entry`` imports statically, however deep (not dynamic import()s), for
    <link rel="modulepreload">: the browser fetches them all at once instead of one level of
    imports per round trip. Preload them by ``static_url()``: the URL the import map sends
    their imports to."""
    root = Path(current_app.static_folder or "")
    seen: list[str] = []
    queue = [entry]
    while queue:
        name = queue.pop(0)
        path = _static_path(name)
        if path is None or name in seen:
            continue
        seen.append(name)
        for target in _STATIC_IMPORT.findall(path.read_text(encoding="utf-8")):
            if target.startswith("."):
                resolved = (path.parent / target).resolve()
                if resolved.is_relative_to(root.resolve()):
                    queue.append(resolved.relative_to(root.resolve()).as_posix())
    return seen[1:]


def _gzipped(path: Path, data: bytes) -> bytes:
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _lock:
        cached = _compressed.get(key)
    if cached is None:
        cached = gzip.compress(data, compresslevel=9, mtime=0)
        with _lock:
            for old in [k for k in _compressed if k[0] == key[0]]:
                del _compressed[old]
            _compressed[key] = cached
    return cached


@bp.after_app_request
def static_delivery(response: Response) -> Response:
    if request.endpoint != "static" or response.status_code not in (200, 304):
        return response
    filename = (request.view_args or {}).get("filename", "")
    wanted = request.args.get("v")
    if wanted and wanted == file_version(filename):
        # This URL names these exact bytes: any cache may keep them for good.
        response.headers["Cache-Control"] = f"public, max-age={YEAR}, immutable"
    else:
        response.headers["Cache-Control"] = "no-cache"  # unversioned (module imports): revalidate
    response.vary.add("Accept-Encoding")
    if (response.status_code != 200 or response.mimetype not in COMPRESSIBLE
            or "gzip" not in request.headers.get("Accept-Encoding", "")
            or "Content-Encoding" in response.headers or "Content-Range" in response.headers):
        return response
    path = _static_path(filename)
    if path is None or path.stat().st_size < MIN_COMPRESS_BYTES:
        return response
    response.direct_passthrough = False
    body = _gzipped(path, response.get_data())
    response.set_data(body)
    response.headers["Content-Encoding"] = "gzip"
    etag, weak = response.get_etag()
    if etag:
        # Not the same bytes as the plain file, so not the same tag. Werkzeug compared the
        # request's If-None-Match with the plain tag only; a browser that holds the gzip bytes
        # sends this one, and gets its 304 here.
        etag = f"{etag}-gzip"
        response.set_etag(etag, weak=weak)
        if request.if_none_match.contains_weak(etag):
            return _not_modified(response)
    return response


def _not_modified(response: Response) -> Response:
    """A 304 carrying the validators and caching headers of ``response``, and no body."""
    kept = Response(status=304)
    for name, value in response.headers.items():
        if not name.lower().startswith("content-") or name.lower().startswith("content-security"):
            kept.headers[name] = value  # the validators, Cache-Control, Vary, security headers
    response.close()
    return kept
