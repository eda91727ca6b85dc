"""The model files themselves, served to the pages whose browser engine downloads and runs them.

The catalogue (catalogue.py) says which files exist; this blueprint only hands them out.
"""

from __future__ import annotations

from flask import Blueprint, abort, send_file, url_for

from .catalogue import BrowserFile, ModelFile

# Larger files cannot be loaded into a page in one piece (ArrayBuffer limit); they stay
# server-only until split with llama-gguf-split.
BROWSER_MAX_BYTES = 2 * 1024**3 - 1

bp = Blueprint("model_files", __name__)  # the name security.py's isolation headers look for


def browser_url(model: ModelFile, file: BrowserFile | None = None) -> str | None:
    """Where a page downloads ``model`` (as ``file``, by default the model's own file); the
    version in the path makes the URL immutable."""
    version, path, size = (file.version, file.path, file.size) if file else (
        model.version, model.path, model.file_size)
    if not model.has_chat_template or size > BROWSER_MAX_BYTES:
        return None
    return url_for("model_files.download", model_id=model.id, version=version, filename=path.name)


@bp.get("/models/<model_id>/<version>/<filename>")
def download(model_id: str, version: str, filename: str):
    """The GGUF file itself: Range requests, ETag/304, cached for a year.

    The path is looked up in the catalogue, never joined from the URL, so nothing outside
    the configured model files can be reached.
    """
    from .services import get_services

    catalogue = get_services().catalogue
    model = catalogue.get(model_id)
    if model is None:
        abort(404)
    # The original (the server's file) or the format derived for browsers.
    candidates = [(model.path, model.version)]
    derived = catalogue.browser(model_id)
    if derived:
        candidates.append((derived.path, derived.version))
    path = next((p for p, v in candidates if v == version and p.name == filename), None)
    if path is None:
        abort(404)
    response = send_file(
        path,
        mimetype="application/octet-stream",
        conditional=True,
        etag=f"{model.id}-{version}",
        max_age=365 * 24 * 3600,
        download_name=path.name,
    )
    response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
    response.headers["Accept-Ranges"] = "bytes"
    return response
