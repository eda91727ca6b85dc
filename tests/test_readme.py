"""Every example in the README runs as pasted, or is checked in the way its kind allows.

The fenced blocks are read from README.md itself. Each must match one entry of HOW (a test
fails on a block nobody decided about, so a new example cannot slip in unchecked):

- the API examples (shell with curl, and Python) run against a live bchat, with ``BCHAT_URL``
  and ``BCHAT_KEY`` set as the README tells its reader to set them;
- commands that start long-running services (``./scripts/run``, gunicorn) are checked by what
  would judge them: ``bchat doctor``'s serving check against the README's own gunicorn line;
- the rest by what they name: settings that exist, a TOML file bchat loads, subcommands and
  options that exist, or the test file that already runs them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from webapp.config import SETTINGS, load_config
from webapp.doctor import check_serving

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BCHAT = [sys.executable, "-m", "webapp.cli"]

# (text the block contains, how it is checked); the first match wins.
HOW = [
    ("$BCHAT_URL/v1/chat/completions", "api-shell"),
    ('os.environ["BCHAT_URL"]', "api-python"),
    ("<!-- gunicorn-command -->", "gunicorn"),
    ("bchat worker --host", "gunicorn"),
    ("bchat users create --admin", "settings"),  # the commands: tests/test_accounts.py
    ("./scripts/run", "script"),
    ("./scripts/test", "script"),
    ("bchat models pull", "models"),
    ("bchat models quantize", "quant"),
    (".venv/bin/bchat doctor", "tests/test_doctor.py"),
    (".venv/bin/bchat db upgrade\n", "db-upgrade"),
    ("createdb -O bchat bchat", "settings"),  # PostgreSQL: needs a superuser; tests/test_postgres.py
    ("BCHAT_OPENAI_BASE_URL", "settings"),
    ("[[upstream]]", "upstreams-toml"),
    ("proxy_pass", "not runnable: nginx configuration"),
    ("pip wheel --no-deps", "tests/test_wheel.py"),
    ("BCHAT_PROXY_FIX=1", "settings"),
    ("websocket /ws (docs/protocol.md)", "not code: a diagram"),
]


def readme_blocks() -> list[tuple[str, str]]:
    """(the line before the block, then the block's text; its language) for every fenced block."""
    found = []
    lines = README.read_text().splitlines()
    start = None
    for i, line in enumerate(lines):
        if not line.startswith("```"):
            continue
        if start is None:
            start = i
        else:
            found.append(("\n".join([lines[start - 1], *lines[start + 1:i]]) + "\n",
                          lines[start][3:].strip()))
            start = None
    return found


def how(block: str) -> str | None:
    return next((kind for needle, kind in HOW if needle in block), None)


def blocks_of(kind: str) -> list[str]:
    return [block for block, _lang in readme_blocks() if how(block) == kind]


def test_every_readme_example_is_accounted_for():
    blocks = readme_blocks()
    assert len(blocks) >= 15
    unknown = [block[:120] for block, _lang in blocks if how(block) is None]
    assert unknown == [], "README examples with no check in tests/test_readme.py: add them to HOW"
    for needle, _kind in HOW:  # and no entry is left over from an example that went away
        assert any(needle in block for block, _lang in blocks), needle


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BCHAT_", "GUNICORN_"))}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's webapp, also for .venv/bin/bchat
    return {**env, **extra}


def test_the_api_examples_run_as_pasted(live_server, db_url):
    (shell,) = blocks_of("api-shell")
    env = environment(BCHAT_URL=live_server.url, BCHAT_DATABASE_URL=db_url)
    ran = subprocess.run(["bash", "-euo", "pipefail", "-c", shell.split("\n", 1)[1]], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert '"object":"list"' in ran.stdout.replace(" ", "")  # /v1/models
    assert '"object":"chat.completion"' in ran.stdout.replace(" ", "")
    assert "unknown_model" not in ran.stdout

    # the Python example, with a key made the way the README says
    made = subprocess.run(BCHAT + ["keys", "create", "--name", "readme"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    (python,) = blocks_of("api-python")
    ran = subprocess.run([sys.executable, "-c", python.split("\n", 1)[1]], cwd=ROOT,
                         env={**env, "BCHAT_KEY": made.stdout.strip().splitlines()[-1]},
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    person = ran.stdout.splitlines()[0]
    assert "'name'" in person and "'age'" in person  # the structured reply, parsed


def gunicorn_lines() -> list[list[str]]:
    lines = []
    for block in blocks_of("gunicorn"):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if "/gunicorn " in line:
                words = shlex.split(line)
                lines.append(words[[i for i, w in enumerate(words) if w.endswith("/gunicorn")][0]:])
    return lines


def test_doctor_passes_the_readme_gunicorn_commands(tmp_path):
    """`bchat doctor` judges what gunicorn would run: the README's own lines must pass it."""
    commands = gunicorn_lines()
    assert len(commands) == 2
    for words in commands:
        args = [w for w in words[1:] if w != "'webapp:create_app()'" and not w.startswith("webapp:")]
        environ = {"GUNICORN_CMD_ARGS": " ".join(args), "BCHAT_INSTANCE_PATH": str(tmp_path)}
        if "-w" in words and words[words.index("-w") + 1] != "1":
            environ["BCHAT_WORKER_URL"] = "http://127.0.0.1:8600"  # as the README's line sets
        config = load_config(tmp_path, environ)
        checks = list(check_serving(config, environ))
        assert [c for c in checks if c.status == "FAIL"] == [], (words, checks)
        assert [c for c in checks if c.status == "warn"] == [], (words, checks)
        threads = words[words.index("--threads") + 1]
        assert any(f"x {threads} threads, -k gthread" in c.detail for c in checks)
        assert any("BCHAT_MAX_SOCKETS not set: each worker admits" in c.detail for c in checks)
    # with nothing in GUNICORN_CMD_ARGS the doctor assumes the README's one-process line
    environ = {"BCHAT_INSTANCE_PATH": str(tmp_path)}
    checks = list(check_serving(load_config(tmp_path, environ), environ))
    assert [c for c in checks if c.status != "ok"] == [], checks
    assert any("1 worker(s) x 32 threads" in c.detail and "README" in c.detail for c in checks)
    assert any("admits 24 websockets and keeps 8 of its 32 threads" in c.detail for c in checks)


def test_doctor_still_fails_a_max_sockets_that_leaves_no_thread(tmp_path):
    environ = {"GUNICORN_CMD_ARGS": "-k gthread --threads 32", "BCHAT_MAX_SOCKETS": "32"}
    checks = list(check_serving(load_config(tmp_path, environ), environ))
    assert any(c.status == "FAIL" and "--threads 32 <= BCHAT_MAX_SOCKETS=32" in c.detail for c in checks)


def test_the_scripts_it_names_exist_and_run():
    for block in blocks_of("script"):
        for line in block.splitlines()[1:]:
            if line.startswith("./scripts/"):
                script = ROOT / line.split()[0]
                assert script.is_file() and os.access(script, os.X_OK), script


def test_the_commands_it_names_exist():
    (block,) = blocks_of("models")
    for line in block.splitlines()[1:]:
        words = shlex.split(line, comments=True)
        command = words[1:3]  # after .venv/bin/bchat: models <pull|list|remove>
        helped = subprocess.run(BCHAT + command + ["--help"], cwd=ROOT, env=environment(),
                                capture_output=True, text=True, timeout=60)
        assert helped.returncode == 0, (line, helped.stderr)
        for option in [w for w in words if w.startswith("--")]:
            assert option in helped.stdout, (line, option)


def test_the_quant_commands_run_as_pasted(tmp_path):
    """quantize and eval as the README writes them, on a tiny model's F16 file of that name."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import write_tiny_model

    from webapp.catalogue import read_model_file
    from webapp.quant import quantize

    (block,) = blocks_of("quant")
    models = tmp_path / "models"
    source = read_model_file(write_tiny_model(tmp_path / "tiny-F32.gguf", dim=256, ff=512))
    quantize(source, "F16", tmp_path, nthread=1).model.path.rename(
        models.mkdir() or models / "SmolLM2-135M-Instruct-F16.gguf")
    env = environment(BCHAT_MODEL_PATH=str(models), BCHAT_INSTANCE_PATH=str(tmp_path / "instance"),
                      BCHAT_N_THREADS="1")
    for line in block.splitlines()[1:]:
        command = shlex.split(line)
        ran = subprocess.run(BCHAT + command[1:], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        assert ran.returncode == 0, (line, ran.stderr)
    assert sorted(p.name for p in models.glob("*.gguf")) == [
        "SmolLM2-135M-Instruct-F16.gguf", "SmolLM2-135M-Instruct-Q4_0.gguf",
        "SmolLM2-135M-Instruct-Q4_K_M.gguf", "SmolLM2-135M-Instruct-Q6_K.gguf",
        "SmolLM2-135M-Instruct-Q8_0.gguf"]
    assert "Q4_K_M" in ran.stdout and "KLD" in ran.stdout
    assert (models / "SmolLM2-135M-Instruct.quality.json").is_file()


def test_db_upgrade_as_written(tmp_path):
    (block,) = blocks_of("db-upgrade")
    command = shlex.split(block.splitlines()[-1])
    assert command == [".venv/bin/bchat", "db", "upgrade"]
    url = f"sqlite:///{tmp_path / 'readme.sqlite3'}"
    ran = subprocess.run(BCHAT + command[1:], cwd=ROOT, env=environment(BCHAT_DATABASE_URL=url),
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "readme.sqlite3").stat().st_size > 0


def test_the_settings_it_names_exist():
    named = set()
    for block in blocks_of("settings"):
        named |= set(re.findall(r"\bBCHAT_([A-Z0-9_]+)", block))
    assert {"OPENAI_BASE_URL", "PASSCODE", "DATABASE_URL"} <= named
    assert sorted(named - set(SETTINGS)) == []


def test_the_upstreams_file_loads(tmp_path, monkeypatch):
    from webapp.engines.openai_compat import load_upstreams

    (block,) = blocks_of("upstreams-toml")
    path = tmp_path / "upstreams.toml"
    path.write_text(block.split("\n", 1)[1])
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test")
    upstreams = load_upstreams({"UPSTREAMS_FILE": str(path)})
    assert [u.name for u in upstreams] == ["vllm", "openrouter"]
    assert upstreams[1].api_key == "sk-test" and upstreams[0].read_timeout == 120


# What each test file that runs a README example itself does, as it appears in its code.
RUN_ELSEWHERE = {
    "tests/test_doctor.py": ['BCHAT + ["doctor"]'],
    "tests/test_wheel.py": ['"wheel", "--no-deps"', '"db", "upgrade"', '"serve"'],
}


@pytest.mark.parametrize("path", sorted(RUN_ELSEWHERE))
def test_examples_run_elsewhere_are_run_there(path):
    assert blocks_of(path), f"no README example is left for {path}"
    text = (ROOT / path).read_text()
    for call in RUN_ELSEWHERE[path]:
        assert call in text, (path, call)
