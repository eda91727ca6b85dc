"""The README's production command, run as written, serves a chat over a real websocket."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

from helpers import HttpSession

ROOT = Path(__file__).resolve().parent.parent


def readme_gunicorn_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- gunicorn-command -->\s*```\w*\n(.+?)\n```", text, re.S)
    assert match, "README.md marks its gunicorn command with <!-- gunicorn-command -->"
    return shlex.split(match.group(1).replace("\\\n", " "))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_gunicorn_command_serves_a_chat(tmp_path, tiny_model):
    from conftest import migrate

    url = f"sqlite:///{tmp_path / 'g.sqlite3'}"
    migrate(url)
    port = free_port()
    command = readme_gunicorn_command()
    assert command[0].endswith("gunicorn") and "gthread" in command
    command = [str(ROOT / ".venv/bin/gunicorn") if c.endswith("gunicorn") and i == 0 else c
               for i, c in enumerate(command)]
    command = [re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", c) for c in command]
    env = {**os.environ, "BCHAT_DATABASE_URL": url, "BCHAT_MODEL_PATH": str(tiny_model),
           "BCHAT_SECRET_KEY": "gunicorn-test", "BCHAT_N_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        visitor = HttpSession(base)
        while True:
            try:
                status, _h, _b = visitor.request("GET", "/healthz")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline and proc.poll() is None, "gunicorn did not start"
            time.sleep(0.2)
        ws = visitor.ws()
        ws.chat("hello gunicorn", options={"temperature": 0, "max_tokens": 12})
        done, frames = ws.until("done")
        assert done["message"]["status"] == "complete"
        assert done["message"]["usage"]["completion_tokens"] == 12
        assert sum(f["type"] == "token" for f in frames) >= 2
        ws.close()
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert "gthread" in output
