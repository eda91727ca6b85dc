"""The bchat command as a user runs it: a real subprocess with BCHAT_* settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BCHAT = [sys.executable, "-m", "webapp.cli"]


def run(args, env_extra, **kwargs):
    env = {**os.environ, **env_extra}
    return subprocess.run(BCHAT + args, env=env, capture_output=True, text=True, timeout=120,
                          **kwargs)


def test_models_lists_facts_from_the_gguf(tiny_model, bundled_model):
    out = run(["models"], {"BCHAT_MODEL_PATH": str(tiny_model)})
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.strip().splitlines()
    for column in ("id", "name", "arch", "params", "quant", "size", "ctx"):
        assert column in header
    assert row.split()[:3] == ["tiny-chat", "bchat-tiny-test", "llama"]
    assert "F32" in row and "4096" in row

    out = run(["models"], {"BCHAT_MODEL_PATH": str(bundled_model)})
    assert out.returncode == 0, out.stderr
    row = out.stdout.strip().splitlines()[1]
    assert "SmolLM2-135M-Instruct" in row and "Q4_1" in row and "llama" in row


def test_models_scans_a_directory_and_skips_broken_files(tmp_path, tiny_model):
    (tmp_path / "a.gguf").write_bytes(tiny_model.read_bytes())
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
    (tmp_path / "notes.txt").write_text("ignored")
    out = run(["models"], {"BCHAT_MODEL_PATH": str(tmp_path)})
    assert out.returncode == 0
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("a ")
    assert "broken.gguf" in out.stderr


def test_db_upgrade_then_serve_checks_schema(tmp_path, tiny_model):
    db = tmp_path / "cli.sqlite3"
    env = {"BCHAT_DATABASE_URL": f"sqlite:///{db}", "BCHAT_MODEL_PATH": str(tiny_model),
           "BCHAT_SECRET_KEY": "x"}
    refused = run(["serve", "--port", "1"], env)
    assert refused.returncode == 2 and "bchat db upgrade" in refused.stderr
    out = run(["db", "upgrade"], env)
    assert out.returncode == 0, out.stderr
    assert db.is_file()


def readme_settings() -> dict[str, str]:
    """Each ``BCHAT_*`` name in the README's setting tables, with its row's default cell."""
    rows: dict[str, str] = {}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `BCHAT_") and len(cells) >= 3:
            for name in re.findall(r"`BCHAT_([A-Z0-9_]+)`", cells[0]):
                rows[name] = cells[1]
    return rows


def test_every_setting_is_documented_in_the_readme_and_listed_by_config():
    """The README's tables and `bchat config` list exactly the settings config.py reads, and
    the README states each plain default as config.py has it."""
    from webapp.config import SETTINGS

    documented = readme_settings()
    assert set(documented) == set(SETTINGS), (
        f"in config.py only: {sorted(set(SETTINGS) - set(documented))}; "
        f"in the README only: {sorted(set(documented) - set(SETTINGS))}")
    listed = set(re.findall(r"^BCHAT_([A-Z0-9_]+)\s", run(["config"], {}).stdout, re.M))
    assert listed == set(SETTINGS)
    for name, (default, _parse, _help) in SETTINGS.items():
        if default is None or isinstance(default, list) or default == 0 and name == "N_THREADS":
            continue  # computed and list defaults are described in words
        if isinstance(default, bool):
            shown = "1" if default else "0"
        elif isinstance(default, float) and default.is_integer() and name != "WS_RECEIVE_TIMEOUT":
            shown = str(int(default))
        else:
            shown = str(default)
        cell = documented[name]
        values = re.findall(r"`([^`]*)`", cell) or [cell]
        assert shown in values, f"BCHAT_{name}: README says {cell!r}, config.py {default!r}"


def test_default_settings_use_the_instance_folder_and_bundled_model(tmp_path):
    from webapp.config import bundled_model_path, load_config

    config = load_config(tmp_path, environ={})
    assert config["DATABASE_URL"] == f"sqlite:///{tmp_path / 'bchat.sqlite3'}"
    assert Path(config["MODEL_PATH"]) == bundled_model_path()
    assert config["N_GPU_LAYERS"] == 0 and config["N_THREADS"] >= 1
    config = load_config(tmp_path, environ={"BCHAT_N_CTX": "1024",
                                            "BCHAT_ALLOWED_ORIGINS": "https://a.org/, https://b.org"})
    assert config["N_CTX"] == 1024
    assert config["ALLOWED_ORIGINS"] == ["https://a.org", "https://b.org"]


def test_secret_key_is_created_once_per_instance(tmp_path):
    from webapp.config import resolve_secret_key

    first, second = {}, {}
    resolve_secret_key(first, tmp_path)
    resolve_secret_key(second, tmp_path)
    assert first["SECRET_KEY"] == second["SECRET_KEY"] and len(first["SECRET_KEY"]) > 40
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_ids_never_read_as_options():
    """`bchat keys revoke ID` and `bchat bench --remove ID` take ids as arguments: one in 64
    random ids used to start with "-", which argparse reads as an option (exit 2)."""
    from webapp.models import new_public_id

    assert not any(new_public_id().startswith("-") for _ in range(5000))
