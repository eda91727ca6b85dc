"""The bchat command as a user runs it: a real subprocess with BCHAT_* settings."""

from __future__ import annotations

import os
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


def test_config_lists_every_setting():
    out = run(["config"], {})
    for name in ("BCHAT_DATABASE_URL", "BCHAT_MODEL_PATH", "BCHAT_N_CTX", "BCHAT_N_THREADS",
                 "BCHAT_N_GPU_LAYERS", "BCHAT_SECRET_KEY", "BCHAT_ALLOWED_ORIGINS"):
        assert name in out.stdout


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
