"""`bchat doctor` as a self-hoster runs it (a subprocess with BCHAT_* settings), and its
checks one by one where a subprocess would add nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from alembic import command

from webapp.db import alembic_config
from webapp.doctor import check_database, check_decode, gunicorn_settings, llama_backends

BCHAT = [sys.executable, "-m", "webapp.cli"]


def doctor(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BCHAT_", "GUNICORN_"))}
    return subprocess.run(BCHAT + ["doctor"], env={**env, **env_extra}, capture_output=True,
                          text=True, timeout=120)


def lines(out: str, status: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(status)]


def test_a_healthy_install_passes_and_says_what_it_found(db_url, tiny_model):
    out = doctor({
        "BCHAT_DATABASE_URL": db_url, "BCHAT_MODEL_PATH": str(tiny_model),
        "GUNICORN_CMD_ARGS": "-k gthread --threads 16 -w 1", "BCHAT_MAX_SOCKETS": "8",
        "BCHAT_PASSCODE": "correct-horse", "BCHAT_ALLOWED_HOSTS": "chat.example.org",
        "BCHAT_SECRET_KEY": "s3cret-key-value",
    })
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines(out.stdout, "FAIL") == []
    text = out.stdout
    assert f"python     {sys.version_info.major}.{sys.version_info.minor}" in text
    assert "llama-cpp-python 0.3" in text and "backends: CPU" in text and "system info: CPU :" in text
    (model,) = [line for line in text.splitlines() if "tiny-chat:" in line]
    assert model.startswith("ok") and "F32" in model and "MiB available" in model
    (decoded,) = lines(text, "ok    decode")
    assert "F32 (tiny-chat): decoded 4 tokens after a" in decoded
    assert "reachable, schema at the latest revision" in text
    assert "1 worker(s) x 16 threads, -k gthread, from GUNICORN_CMD_ARGS" in text
    assert "BCHAT_MAX_SOCKETS=8 leaves 8 threads" in text
    assert "allowed hosts: chat.example.org" in text
    assert "passcode set (13 characters)" in text
    assert "correct-horse" not in text and "s3cret-key-value" not in text, "secrets are never printed"
    assert text.rstrip().endswith("0 problem(s), 0 warning(s)")


def test_problems_fail_with_what_to_do(tmp_path):
    missing_db = tmp_path / "never-migrated.sqlite3"
    out = doctor({
        "BCHAT_DATABASE_URL": f"sqlite:///{missing_db}", "BCHAT_MODEL_PATH": str(tmp_path / "nothing"),
        "GUNICORN_CMD_ARGS": "--threads=32 --workers 4 -k gevent", "BCHAT_MAX_SOCKETS": "32",
        "BCHAT_PASSCODE": "1234", "BCHAT_N_GPU_LAYERS": "-1",
    })
    assert out.returncode == 1
    failed = "\n".join(lines(out.stdout, "FAIL"))
    assert f"no readable .gguf files at {tmp_path / 'nothing'}" in failed
    assert "does not exist yet: run `bchat db upgrade`" in failed
    assert not missing_db.exists(), "doctor must not create the database"
    assert "-k gevent: websockets need the gthread worker" in failed
    assert "--threads 32 <= BCHAT_MAX_SOCKETS=32" in failed
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        assert "BCHAT_N_GPU_LAYERS=-1 but this build has no GPU backend" in failed
    warned = "\n".join(lines(out.stdout, "warn"))
    assert "passcode set (4 characters; use at least 8)" in warned
    assert "4 workers each load their own copy" in warned


@pytest.mark.databases("sqlite", "postgresql")
def test_database_check_on_each_database(db_url, new_database):
    (check,) = check_database({"DATABASE_URL": db_url})
    assert check.status == "ok" and "schema at the latest revision" in check.detail
    behind = new_database(migrated=False)
    command.upgrade(alembic_config(behind), "0002")  # an older schema
    (check,) = check_database({"DATABASE_URL": behind})
    assert check.status == "FAIL" and "run `bchat db upgrade`" in check.detail


def test_unreachable_postgresql_is_a_clear_failure():
    (check,) = check_database({"DATABASE_URL": "postgresql://bchat:hunter2-pw@127.0.0.1:1/bchat"})
    assert check.status == "FAIL" and "is not reachable" in check.detail
    assert "bchat:***@127.0.0.1:1" in check.detail and "hunter2-pw" not in check.detail


def test_settings_parsing():
    assert gunicorn_settings({"GUNICORN_CMD_ARGS": "-w 2 --threads=48 --worker-class gthread"}) == {
        "workers": 2, "threads": 48, "worker_class": "gthread"}
    assert gunicorn_settings({}) == {}
    cuda = "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | CPU : SSE3 = 1 | AVX = 1 |"
    assert llama_backends(cuda) == ["CUDA", "CPU"]
    assert llama_backends("Metal : EMBED_LIBRARY = 1 | CPU : NEON = 1 |") == ["Metal", "CPU"]


@pytest.mark.parametrize("sig", ["SIGILL", "SIGSEGV"])
def test_a_decoding_child_that_crashes_is_a_failure_that_names_the_signal(tiny_model, sig):
    """What a native build with AMX kernels did on the first decode: the smoke test's child
    dies by a signal, and doctor (and so scripts/setup) says FAIL with the signal and the fix."""
    crashing = [sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), signal.{sig})"]
    (check,) = check_decode({"MODEL_PATH": str(tiny_model), "N_THREADS": 1}, command=crashing)
    assert check.status == "FAIL"
    assert f"F32 (tiny-chat): the decoding process crashed with {sig}" in check.detail
    assert "GGML_NATIVE=OFF" in check.detail and "./scripts/setup" in check.detail


def test_smoke_only_is_what_setup_runs_and_exits_by_its_verdict(tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BCHAT_", "GUNICORN_"))}
    ok = subprocess.run(BCHAT + ["doctor", "--smoke-only"], capture_output=True, text=True, timeout=120,
                        env={**env, "BCHAT_MODEL_PATH": str(tiny_model)})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "decoded 4 tokens" in ok.stdout and "database" not in ok.stdout
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_model.read_bytes()[:4096])  # a header with no weights
    bad = subprocess.run(BCHAT + ["doctor", "--smoke-only"], capture_output=True, text=True, timeout=120,
                         env={**env, "BCHAT_MODEL_PATH": str(broken)})
    assert bad.returncode == 1 and "FAIL" in bad.stdout, bad.stdout
