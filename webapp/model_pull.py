"""``bchat models pull`` and ``remove``: put a GGUF file into the models folder, safely.

Only a person running the command downloads anything; the app itself never fetches weights.
A pull writes ``NAME.gguf.part`` next to the destination and resumes it with an HTTP Range
request after a dropped connection (in the same run, or in a later one). Before the file gets
its real name it must

- have the size the server announced,
- start with the GGUF magic and parse as a GGUF header,
- match the sha256 the hub publishes for it (``X-Linked-Etag`` on a Hugging Face LFS file) or
  the one given with ``--sha256``; otherwise its sha256 is computed and recorded,

and the sha256 is kept in a sidecar ``NAME.gguf.sha256`` (``sha256sum -c`` format). The final
step is one ``os.replace``: a half-downloaded or unverified file never carries a ``.gguf`` name
the catalogue would pick up.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote, unquote, urljoin, urlsplit

GGUF_MAGIC = b"GGUF"
CHUNK_BYTES = 1 << 20
HF_ENDPOINT = "https://huggingface.co"  # HF_ENDPOINT overrides it, as in huggingface_hub
USER_AGENT = "bchat-models-pull/1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class PullError(Exception):
    """A pull that cannot go on; the message says why and what to do."""


class _Retryable(Exception):
    """The connection broke or ended early: resume from what the .part file holds."""


@dataclass(frozen=True)
class Source:
    url: str
    filename: str
    from_hub: bool


@dataclass
class Remote:
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class PullResult:
    path: Path
    size: int
    sha256: str
    checked_against: str | None  # "hub", "given", or None when only recorded


def parse_source(spec: str, endpoint: str | None = None) -> Source:
    """``hf://USER/REPO[@REVISION]/PATH.gguf`` or an ``http(s)://`` URL of a .gguf file."""
    if spec.startswith("hf://"):
        parts = spec.removeprefix("hf://").split("/")
        if len(parts) < 3 or not all(parts):
            raise PullError(f"{spec!r}: expected hf://USER/REPO/FILE.gguf (or hf://USER/REPO@REVISION/FILE.gguf)")
        user, repo, path = parts[0], parts[1], "/".join(parts[2:])
        repo, _, revision = repo.partition("@")
        if not repo:
            raise PullError(f"{spec!r}: the repository name is empty")
        base = (endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
        url = f"{base}/{user}/{repo}/resolve/{quote(revision or 'main', safe='')}/{quote(path)}"
        filename, from_hub = parts[-1], True
    elif spec.startswith(("https://", "http://")):
        url, from_hub = spec, False
        filename = unquote(urlsplit(spec).path.rsplit("/", 1)[-1])
    else:
        raise PullError(f"{spec!r}: expected hf://USER/REPO/FILE.gguf or an http(s):// URL")
    if not filename.endswith(".gguf"):
        raise PullError(f"{spec!r}: the file name should end in .gguf (use --name to choose one)")
    return Source(url=url, filename=filename, from_hub=from_hub)


def check_name(name: str) -> str:
    """A bare file name inside the models folder: no folders, no hidden files."""
    if not name.endswith(".gguf"):
        name += ".gguf"
    if "/" in name or "\\" in name or name.startswith(".") or name in (".gguf",):
        raise PullError(f"{name!r}: a model name is a plain file name such as model-Q4_K_M.gguf")
    return name


def models_dir(config: dict, instance_path: Path) -> Path:
    """``BCHAT_MODEL_PATH`` when it is a folder (the app then serves what is pulled), else
    ``instance/models``."""
    configured = Path(str(config.get("MODEL_PATH") or ""))
    return configured if configured.is_dir() else instance_path / "models"


# -- HTTP ----------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None):
    # identity: a gzip-encoded body would make byte offsets (Range) and sizes meaningless
    return urllib.request.Request(url, method=method, headers={
        "User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})})


def probe_hub(url: str, timeout: float = 30) -> Remote:
    """The hub's own metadata for a file, as huggingface_hub reads it: a HEAD request that does
    not follow the redirect to the CDN (whose headers describe the CDN object, not the file).

    An LFS file's ``X-Linked-Etag`` is the sha256 of its content, ``X-Linked-Size`` its size.
    """
    opener = urllib.request.build_opener(_NoRedirect())
    for _ in range(5):  # same-site redirects (a renamed repository) are followed
        try:
            with opener.open(_request(url, "HEAD"), timeout=timeout) as response:
                headers = response.headers
        except urllib.error.HTTPError as err:
            if err.code in (301, 302, 303, 307, 308) and err.headers.get("Location", "").startswith("/"):
                url = urljoin(url, err.headers["Location"])
                continue
            if err.code in (301, 302, 303, 307, 308):
                headers = err.headers
            elif err.code in (401, 403, 404):
                raise PullError(f"{url}: HTTP {err.code} — no such file, or the repository is "
                                "gated/private (bchat does not log in to the hub)") from None
            else:
                raise PullError(f"{url}: HTTP {err.code} {err.reason}") from None
        except OSError as err:
            raise PullError(f"{url}: {err}") from None
        break
    etag = (headers.get("X-Linked-Etag") or "").removeprefix("W/").strip('"').lower()
    size = headers.get("X-Linked-Size")
    return Remote(size=int(size) if size and size.isdigit() else None,
                  sha256=etag if _SHA256.fullmatch(etag) else None)


class Progress:
    """One line on stderr, rewritten at most every quarter second."""

    def __init__(self, label: str, total: int | None, done: int = 0, stream: IO[str] | None = None) -> None:
        self.label, self.total, self.done = label, total, done
        self.stream = stream or sys.stderr
        self._started = time.monotonic()
        self._start_bytes = done
        self._shown = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._shown >= 0.25:
            self._shown = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = (self.done - self._start_bytes) / max(now - self._started, 1e-6) / 2**20
        if self.total:
            width = 30
            filled = int(width * self.done / self.total)
            text = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                    f"{self.done / 2**20:.1f}/{self.total / 2**20:.1f} MiB {rate:.1f} MiB/s")
        else:
            text = f"{self.label} {self.done / 2**20:.1f} MiB {rate:.1f} MiB/s"
        self.stream.write("\r" + text)
        self.stream.flush()

    def finish(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


def _download(url: str, part: Path, remote: Remote, progress_stream: IO[str] | None) -> None:
    """Fetch the rest of ``url`` into ``part`` (appending from its current size)."""
    start = part.stat().st_size if part.exists() else 0
    if remote.size is not None and start > remote.size:
        start = 0  # not the same file any more: start over
    if remote.size is not None and start == remote.size:
        return
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        response = urllib.request.urlopen(_request(url, headers=headers), timeout=30)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start and remote.size is None:
            return  # nothing beyond what we hold: the .part is the whole file
        raise PullError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (OSError, http.client.HTTPException) as err:
        raise _Retryable(str(err)) from err
    with response:
        total: int | None = None
        if start and response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != start:
                raise PullError(f"{url}: the server answered a resume with the wrong range "
                                f"({response.headers.get('Content-Range')!r})")
            total = int(match.group(3)) if match.group(3) != "*" else None
        else:
            start = 0  # 200: the server sent the whole file (no Range support)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if remote.size is None:
            remote.size = total
        elif total is not None and total != remote.size:
            raise PullError(f"{url}: the server says {total} bytes, the hub said {remote.size}")
        progress = Progress(part.name.removesuffix(".part"), remote.size, start, progress_stream)
        with part.open("r+b" if start else "wb") as fh:
            fh.seek(start)
            fh.truncate()
            try:
                while chunk := response.read(CHUNK_BYTES):
                    if fh.tell() == 0 and not chunk.startswith(GGUF_MAGIC):
                        raise PullError(f"{url} is not a GGUF file (it starts with {chunk[:16]!r})")
                    fh.write(chunk)
                    progress.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                raise _Retryable(f"connection lost at {fh.tell()} bytes: {err}") from err
            finally:
                fh.flush()
                os.fsync(fh.fileno())
                progress.finish()
    held = part.stat().st_size
    if remote.size is not None and held < remote.size:
        raise _Retryable(f"the connection ended at {held} of {remote.size} bytes")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pull(
    spec: str,
    dest_dir: Path,
    *,
    name: str | None = None,
    sha256: str | None = None,
    retries: int = 5,
    retry_wait: float = 2.0,
    progress_stream: IO[str] | None = None,
) -> PullResult:
    """Download ``spec`` into ``dest_dir``; see the module docstring for the checks."""
    source = parse_source(spec)
    filename = check_name(name or source.filename)
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _SHA256.fullmatch(sha256):
            raise PullError(f"--sha256 {sha256!r}: expected 64 hex digits")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    if dest.exists():
        raise PullError(f"{dest} already exists; `bchat models remove {filename}` first to replace it")
    part = dest_dir / (filename + ".part")

    remote = probe_hub(source.url) if source.from_hub else Remote()
    if sha256 and remote.sha256 and sha256 != remote.sha256:
        raise PullError(f"--sha256 {sha256} differs from the hub's {remote.sha256}")
    if sha256:
        expected, checked_against = sha256, "given"
    else:
        expected, checked_against = remote.sha256, ("hub" if remote.sha256 else None)

    with part.open("ab") as lock:  # one pull per file at a time (the lock dies with the process)
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PullError(f"another `bchat models pull` is downloading {filename}") from None
            raise
        attempt = 0
        while True:
            try:
                _download(source.url, part, remote, progress_stream)
                break
            except _Retryable as err:
                attempt += 1
                if attempt > retries:
                    raise PullError(f"{source.url}: {err}; run the same command again to resume "
                                    f"({part.stat().st_size} bytes kept in {part})") from None
                print(f"bchat: {err}; resuming (try {attempt} of {retries})",
                      file=progress_stream or sys.stderr)
                time.sleep(retry_wait * attempt)  # back off from a struggling server
            except PullError:
                part.unlink(missing_ok=True)  # a wrong file is not worth resuming
                raise

        try:
            size = part.stat().st_size
            if remote.size is not None and size != remote.size:
                raise PullError(f"downloaded {size} bytes, expected {remote.size}")
            with part.open("rb") as fh:
                if fh.read(4) != GGUF_MAGIC:
                    raise PullError(f"{source.url} is not a GGUF file (no GGUF magic)")
            actual = file_sha256(part)
            if expected and actual != expected:
                raise PullError(f"checksum mismatch for {filename}: expected sha256 {expected} "
                                f"({checked_against}), got {actual}; the download was removed")
            from .catalogue import read_model_file

            try:
                read_model_file(part, filename.removesuffix(".gguf"))
            except Exception as err:
                raise PullError(f"{filename} is not a readable GGUF file: {err}") from None
        except PullError:
            part.unlink(missing_ok=True)
            raise
        _write_atomically(dest_dir / (filename + ".sha256"), f"{actual}  {filename}\n")
        os.replace(part, dest)
        dir_fd = os.open(dest_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
    return PullResult(path=dest, size=size, sha256=actual, checked_against=checked_against)


def remove(name: str, dest_dir: Path) -> list[Path]:
    """Delete a model, its sidecars (sha256; quant.py's record of a variant) and any partial
    download; returns what was removed."""
    filename = check_name(name)
    paths = [dest_dir / filename, dest_dir / (filename + ".sha256"), dest_dir / (filename + ".part"),
             dest_dir / (filename + ".quant.json")]
    removed = [p for p in paths if p.is_file()]
    if not removed:
        raise PullError(f"no model {filename} in {dest_dir}")
    for path in removed:
        path.unlink()
    return removed
