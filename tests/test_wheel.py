"""The wheel installs anywhere: built from this checkout, installed into a fresh venv outside
it, it migrates a database and serves the chat page, its static files and a chat with nothing
but its own files (templates, static, migrations and alembic.ini all inside the package)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import HttpSession, free_port, wait_for_http

ROOT = Path(__file__).resolve().parent.parent

# Build from a copy so stale files in the checkout's build/ never reach the wheel, and a build
# never writes into the checkout; what the app needs at run time is all under webapp/.
_TOP_LEVEL_SKIPPED = {".venv", ".git", "build", "dist", "instance", "tests", "bench", "bchat.egg-info",
                      ".pytest_cache", ".ruff_cache"}


def _not_copied(folder: str, names: list[str]) -> set[str]:
    skipped = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
    return skipped | (_TOP_LEVEL_SKIPPED & set(names) if Path(folder) == ROOT else set())


def _checked(command: list[str]) -> None:
    # No PYTHONPATH: a checkout on it (with its bchat.egg-info from `pip install -e`) makes pip
    # think bchat is installed already, and the fresh venv would never get the wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def build_wheel(workdir: Path) -> Path:
    source = workdir / "src"
    shutil.copytree(ROOT, source, ignore=_not_copied, symlinks=True)
    dist = workdir / "dist"
    _checked([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("bchat-*.whl")
    return wheel


def test_wheel_installs_and_serves_outside_the_checkout(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("wheel")
    assert not work.resolve().is_relative_to(ROOT)
    wheel = build_wheel(work)

    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("webapp/alembic.ini", "webapp/migrations/env.py", "webapp/migrations/script.py.mako",
                   "webapp/templates/chat.html", "webapp/static/js/app.js",
                   "webapp/static/vendor/wllama/wllama.wasm", "webapp/static/vendor/manifest.json",
                   "webapp/static/vendor/wllama/LICENSE"):
        assert needed in names, needed
    assert any(n.startswith("webapp/migrations/versions/0001_") for n in names)
    assert not any(n.startswith("tests/") or "axe" in n or "__pycache__" in n for n in names)

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, bchat = venv / "bin" / "python", venv / "bin" / "bchat"
    constraints = str(ROOT / "constraints.txt")
    # As the README says: first the llama.cpp build scripts/setup made and smoke-tested here
    # (pip would compile another one, natively, in minutes), then bchat with its pinned deps.
    llama_wheel = (ROOT / ".venv" / "llama-cpp-wheel").read_text().strip()
    _checked([str(python), "-m", "pip", "install", "-q", llama_wheel])
    _checked([str(python), "-m", "pip", "install", "-q", "-c", constraints, str(wheel)])  # deps: PyPI/cache
    _checked([str(python), "-c", "import llama_cpp; assert llama_cpp.__version__"])

    cwd = work / "cwd"
    cwd.mkdir()
    instance = work / "instance"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BCHAT_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(BCHAT_INSTANCE_PATH=str(instance), BCHAT_MODEL_PATH=str(tiny_model), BCHAT_N_THREADS="1")

    def run(*args: str) -> str:
        done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    # the venv's own copy is what runs, not this checkout's (no PYTHONPATH, cwd outside)
    installed = Path(run(str(python), "-c", "import webapp; print(webapp.__file__)").strip())
    assert installed.is_relative_to(venv) and not installed.is_relative_to(ROOT)
    # without the override, Flask's rule for installed packages: <prefix>/var/webapp-instance
    default = run(str(python), "-c", "from webapp.config import instance_path as p; print(p({}))").strip()
    assert Path(default) == venv / "var" / "webapp-instance"

    assert "database at head" in run(str(bchat), "db", "upgrade")  # a migration from inside the wheel
    assert (instance / "bchat.sqlite3").is_file()

    port = free_port()
    proc = subprocess.Popen([str(bchat), "serve", "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(base + "/healthz", proc, timeout=60)
        visitor = HttpSession(base)
        status, _headers, page = visitor.request("GET", "/")
        page = page.decode() if isinstance(page, bytes) else page
        assert status == 200
        app_js = re.search(r'src="(/static/js/app\.js\?v=[0-9a-f]{12})"', page)
        assert app_js, "the chat page references its JS module"
        for path in (app_js.group(1), "/static/vendor/wllama/index.js", "/static/css/app.css"):
            status, _headers, body = visitor.request("GET", path)
            assert status == 200 and len(body) > 100, path
        ws = visitor.ws()
        ws.chat("hi", options={"temperature": 0, "max_tokens": 8})
        done, _frames = ws.until("done")
        assert done["message"]["status"] == "complete"
        ws.close()
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert (instance / "secret_key").is_file(), output  # the server used the same instance folder


def test_instance_folder_in_a_checkout_and_its_override(tmp_path):
    from webapp.config import instance_path

    assert instance_path({}) == ROOT / "instance"  # what the README's checkout commands use
    assert instance_path({"BCHAT_INSTANCE_PATH": str(tmp_path / "here")}) == tmp_path / "here"

    from webapp import PACKAGE_DIR

    for inside in ("static/js/app.js", "templates/chat.html", "migrations/env.py", "alembic.ini"):
        assert (PACKAGE_DIR / inside).is_file(), inside
