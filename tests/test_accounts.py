"""Accounts (BCHAT_ACCOUNTS): sign-up keeps an anonymous visitor's data, sessions, device
links, sign-in limits, the admin's 404, quotas, deleting, `bchat users`; on both databases
where storage is touched."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
from argon2 import PasswordHasher
from helpers import text_of
from sqlalchemy import func, select

from webapp.accounts import get_accounts
from webapp.admin import csv_text
from webapp.errors import AppError
from webapp.limits import SIGNIN_FREE_PER_ACCOUNT, SIGNIN_FREE_PER_ADDRESS, Backoff
from webapp.models import Attachment, AttachmentPassage
from webapp.security import redact

PASSWORD = "correct horse battery"
both = pytest.mark.databases("sqlite", "postgresql")


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def signup(client, username="ana", password=PASSWORD, **environ):
    page = client.get("/signup", environ_base=environ)
    return client.post("/signup", data={"csrf": csrf_of(page.text), "username": username,
                                        "password": password, "password2": password},
                       environ_base=environ)


def signin(client, username="ana", password=PASSWORD, **environ):
    page = client.get("/signin", environ_base=environ)
    return client.post("/signin", data={"csrf": csrf_of(page.text), "username": username,
                                        "password": password}, environ_base=environ)


def account_form(client, path, **fields):
    page = client.get("/account")
    return client.post(path, data={"csrf": csrf_of(page.text), **fields})


def titles(client):
    response = client.get("/api/conversations")
    assert response.status_code == 200, response.text
    return sorted(c["title"] for c in response.json["conversations"])


@pytest.fixture
def optional_app(make_app):
    return make_app(ACCOUNTS="optional")


@both
def test_sign_up_keeps_the_anonymous_visitors_data(optional_app):
    client = optional_app.test_client()
    conv = client.post("/api/conversations", json={"title": "before the account"}).json
    assert client.put("/api/defaults", json={"settings": {"temperature": 0.3}}).status_code == 200
    key = client.post("/api/keys", json={"name": "laptop script"}).json
    assert client.post(f"/api/conversations/{conv['id']}/share", json={}).status_code in (200, 201)
    anonymous_cookie = client.get_cookie("bchat").value

    response = signup(client)
    assert response.status_code == 303
    assert titles(client) == ["before the account"]
    assert client.get("/api/defaults").json["settings"]["temperature"] == 0.3
    assert [k["name"] for k in client.get("/api/keys").json["keys"]] == ["laptop script"]
    assert len(client.get("/api/shares").json["shares"]) == 1

    # The session was rotated: the cookie from before sign-up no longer sees anything.
    assert client.get_cookie("bchat").value != anonymous_cookie
    old = optional_app.test_client()
    old.set_cookie("bchat", anonymous_cookie)
    assert titles(old) == []
    assert old.get("/api/keys").json["keys"] == []

    # The key now acts as the account: a /v1 call made with it lands in the account's list.
    done = old.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key['token']}"},
                    json={"model": "tiny-chat", "max_tokens": 4,
                          "messages": [{"role": "user", "content": "from the script"}]})
    assert done.status_code == 200, done.text
    assert "from the script" in titles(client)


def upload(client, name="notes.md", text="the fox is brown\n"):
    response = client.post("/api/attachments", data={"file": (io.BytesIO(text.encode()), name)},
                           content_type="multipart/form-data")
    assert response.status_code == 201, response.text
    return response.json


@both
def test_sign_up_keeps_files_not_yet_sent_and_deleting_the_account_removes_them(optional_app):
    client = optional_app.test_client()
    unsent = upload(client)
    signup(client)
    got = client.get(f"/api/attachments/{unsent['id']}")
    assert got.status_code == 200 and got.json["filename"] == "notes.md"
    with optional_app.app_context():
        accounts = get_accounts()
        account = accounts.by_username("ana")
        db = optional_app.extensions["bchat"].db
        with db.read() as session:
            owners = session.scalars(select(Attachment.owner_id)).all()
        assert owners == [account["owner_id"]]  # the storage quota counts it for the account
        accounts.delete(account["id"])
        with db.read() as session:
            assert session.scalar(select(func.count()).select_from(Attachment)) == 0
            assert session.scalar(select(func.count()).select_from(AttachmentPassage)) == 0


@both
def test_signing_in_merges_a_second_browsers_chats(optional_app):
    laptop = optional_app.test_client()
    laptop.post("/api/conversations", json={"title": "laptop chat"})
    signup(laptop)
    phone = optional_app.test_client()
    phone.post("/api/conversations", json={"title": "phone chat"})
    assert signin(phone).status_code == 303
    assert titles(phone) == ["laptop chat", "phone chat"]
    assert titles(laptop) == ["laptop chat", "phone chat"]


def test_forms_need_their_csrf_token(optional_app):
    client = optional_app.test_client()
    signup(client)
    other = optional_app.test_client()
    other.get("/signin")
    assert other.post("/signin", data={"username": "ana", "password": PASSWORD}).status_code == 403
    assert other.post("/signin", data={"csrf": "x" * 64, "username": "ana",
                                       "password": PASSWORD}).status_code == 403
    assert client.post("/signout", data={}).status_code == 403
    assert client.post("/account/device-link", data={"csrf": ""}).status_code == 403
    assert titles(other) == []


def test_unknown_users_cost_a_password_check_and_nothing_is_logged(optional_app, caplog, monkeypatch):
    client = optional_app.test_client()
    signup(client, "bob")
    with optional_app.app_context():
        accounts = get_accounts()
    verified = []

    class CountingHasher(PasswordHasher):  # the real argon2id, with its verifies counted
        def verify(self, stored, given):
            verified.append(stored)
            return super().verify(stored, given)

    monkeypatch.setattr(accounts, "hasher", CountingHasher())
    caplog.set_level(logging.DEBUG)
    secret = "Sup3r-Secret-Guess"
    for name in ("nobody-here", "bob", "Not A Valid Name!"):
        response = signin(optional_app.test_client(), name, secret)
        assert response.status_code == 403
        assert "do not match" in response.text
    assert len(verified) == 3  # an argon2 verify for the unknown and the malformed name too
    assert signin(optional_app.test_client(), "BOB", PASSWORD).status_code == 303  # any case
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "failed sign-in" in logged
    assert secret not in logged and PASSWORD not in logged
    with optional_app.app_context():
        audit = get_accounts().audit_log()
    assert [e["action"] for e in audit][:2] == ["sign_in", "sign_in_failed"]
    assert secret not in repr(audit) and PASSWORD not in repr(audit)


def test_brute_force_meets_the_limit_per_account_and_per_address(optional_app):
    # The backoff's clock stands still here, so a slow machine cannot let a wait run out
    # between two tries (the waits themselves: test_backoff_doubles_after_the_free_tries).
    limits = optional_app.extensions["bchat.limits"]
    for backoff in (limits.signin_failures, limits.signin_address_failures):
        backoff.clock = lambda: 1000.0
    signup(optional_app.test_client(), "carol")
    attacker = optional_app.test_client()
    for _ in range(SIGNIN_FREE_PER_ACCOUNT):
        assert signin(attacker, "carol", "wrong password").status_code == 403
    limited = signin(attacker, "carol", "wrong password")
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    # Even the right password waits now: the limit cannot be stepped around.
    assert signin(attacker, "carol", PASSWORD).status_code == 429
    # Another address trying another name is not held up by carol's limit …
    assert signin(optional_app.test_client(), "dave", "x" * 10,
                  REMOTE_ADDR="10.1.2.3").status_code == 403
    # … but one /64 spraying names meets the per-address limit, whichever address in it.
    for i in range(SIGNIN_FREE_PER_ADDRESS):
        response = signin(optional_app.test_client(), f"name{i}", "wrong password",
                          REMOTE_ADDR=f"2001:db8:1:2::{i + 1:x}")
        assert response.status_code == 403
    sprayed = signin(optional_app.test_client(), "carol", PASSWORD, REMOTE_ADDR="2001:db8:1:2:ffff::9")
    assert sprayed.status_code == 429
    assert signin(optional_app.test_client(), "carol", "wrong", REMOTE_ADDR="2001:db8:1:3::1"
                  ).status_code == 429  # carol's own count still holds from any network


def test_refused_sign_ins_write_one_audit_row_per_backoff_step(optional_app):
    limits = optional_app.extensions["bchat.limits"]
    now = [1000.0]
    for backoff in (limits.signin_failures, limits.signin_address_failures):
        backoff.clock = lambda: now[0]
    signup(optional_app.test_client(), "erin")
    attacker = optional_app.test_client()
    for _ in range(SIGNIN_FREE_PER_ACCOUNT):
        assert signin(attacker, "erin", "wrong password").status_code == 403
    for _ in range(5):  # a flood during the wait
        assert signin(attacker, "erin", "wrong password").status_code == 429

    def limited():
        with optional_app.app_context():
            return [e for e in get_accounts().audit_log() if e["action"] == "sign_in_limited"]

    assert len(limited()) == 1
    now[0] += 1  # the wait ran out: one more counted try, then the next step's refusals
    assert signin(attacker, "erin", "wrong password").status_code == 403
    for _ in range(3):
        assert signin(attacker, "erin", "wrong password").status_code == 429
    assert len(limited()) == 2


def test_backoff_doubles_after_the_free_tries():
    now = [0.0]
    backoff = Backoff(free=2, cap=60, clock=lambda: now[0])
    assert backoff.check(["k"]) == 0 and backoff.check(["k"]) == 0
    assert backoff.check(["k"]) == pytest.approx(1.0)
    now[0] += 1.0
    assert backoff.check(["k"]) == 0  # the third try, after a 1 s wait
    assert backoff.check(["k"]) == pytest.approx(2.0)  # then 2 s
    now[0] += 2.0
    assert backoff.check(["k"]) == 0
    assert backoff.check(["k"]) == pytest.approx(4.0)
    backoff.succeeded("k")
    assert backoff.check(["k"]) == 0
    now[0] += 1000  # quiet for longer than the cap: starts over
    assert backoff.check(["other"]) == 0


def test_backoff_forgets_failures_only_after_a_day_of_quiet():
    now = [0.0]
    backoff = Backoff(free=2, cap=900, clock=lambda: now[0])
    for _ in range(2):
        assert backoff.check(["k"]) == 0
    for _ in range(12):  # waits of 1 s, 2 s … up to the 900 s cap
        wait = backoff.check(["k"])
        assert 0 < wait <= 900
        now[0] += wait
        assert backoff.check(["k"]) == 0
    now[0] += 3600  # an hour's pause: still slow, no free tries back
    assert backoff.check(["k"]) == 0
    assert backoff.check(["k"]) == pytest.approx(900)
    now[0] += 24 * 3600 + 1  # a day of quiet: forgotten
    assert backoff.check(["k"]) == 0 and backoff.check(["k"]) == 0


def test_admin_pages_are_404_to_everyone_but_an_admin(make_app):
    app = make_app(ACCOUNTS="required")
    anonymous = app.test_client()
    user = app.test_client()
    with app.app_context():
        get_accounts().create("teacher", PASSWORD, role="admin")
        get_accounts().create("student", PASSWORD)
    assert signin(user, "student").status_code == 303
    for client in (anonymous, user):
        for path in ("/admin", "/admin/", "/admin/usage.csv", "/admin/users/whatever"):
            assert client.get(path).status_code == 404, path
        assert client.post("/admin/users", data={"username": "x", "password": PASSWORD}).status_code == 404
    admin = app.test_client()
    assert signin(admin, "teacher").status_code == 303
    page = admin.get("/admin/")
    assert page.status_code == 200 and "student" in page.text
    assert admin.get("/admin").status_code == 200
    off = make_app()  # accounts off: no admin page at all
    assert off.test_client().get("/admin/").status_code == 404


def test_usage_csv_cells_never_start_a_formula():
    for cell in ("=1+1", "+1", "-1", "@SUM(A1)", "\t=1+1", "\r=1+1"):
        assert csv_text(cell) == "'" + cell
    assert csv_text("qwen2.5-0.5b") == "qwen2.5-0.5b"


@both
def test_required_mode_gates_pages_api_and_keys_but_not_share_links(make_app):
    app = make_app(ACCOUNTS="required")
    with app.app_context():
        get_accounts().create("ana", PASSWORD)
        stray_key = app.extensions["bchat"].keys.create("an-anonymous-owner", "old key")[1]
    anonymous = app.test_client()
    assert anonymous.get("/").status_code == 302
    assert "/signin" in anonymous.get("/").headers["Location"]
    api = anonymous.get("/api/conversations")
    assert api.status_code == 401 and api.json["error"]["code"] == "sign_in_required"
    assert anonymous.get("/signin").status_code == 200 and anonymous.get("/signup").status_code == 200
    assert anonymous.get("/healthz").status_code == 200
    v1 = anonymous.get("/v1/models", headers={"Authorization": f"Bearer {stray_key}"})
    assert v1.status_code == 401  # a key with no account behind it does not work

    ana = app.test_client()
    assert signin(ana, "ana").status_code == 303
    conv = ana.post("/api/conversations", json={"title": "shared one"}).json
    share = ana.post(f"/api/conversations/{conv['id']}/share", json={}).json
    token = share["url"].rsplit("/s/", 1)[1]
    key = ana.post("/api/keys", json={"name": "k"}).json["token"]
    assert anonymous.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    # A share link stays readable by anyone; continuing it asks for an account first.
    snapshot = anonymous.get(f"/s/{token}")
    assert snapshot.status_code == 200 and "shared one" in snapshot.text
    cont = anonymous.post(f"/s/{token}/continue", data={"csrf": csrf_of(snapshot.text)})
    assert cont.status_code == 303 and "/signin" in cont.headers["Location"]

    # Deleting the account deletes its data and its keys with it.
    with app.app_context():
        accounts = get_accounts()
        gone = accounts.delete(accounts.by_username("ana")["id"])
        assert gone["username"] == "ana"
        assert app.extensions["bchat"].chats.list_conversations(gone["owner_id"])[0] == []
    assert anonymous.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert anonymous.get(f"/s/{token}").status_code == 404
    assert ana.get("/api/conversations").status_code == 401  # its session died with it


@both
def test_device_link_signs_in_once_and_sessions_can_be_revoked(optional_app):
    laptop = optional_app.test_client()
    laptop.post("/api/conversations", json={"title": "mine"})
    signup(laptop)
    page = account_form(laptop, "/account/device-link")
    assert page.status_code == 200 and "<svg" in page.text
    link = re.search(r'value="(http://[^"]+/d/[^"]+)"', page.text).group(1)
    path = link.split("localhost", 1)[1]

    phone = optional_app.test_client()
    confirm = phone.get(path)
    assert confirm.status_code == 200  # a GET (a link preview) does not use it up
    assert phone.get(path).status_code == 200
    assert phone.post(path, data={"csrf": csrf_of(confirm.text)}).status_code == 303
    assert titles(phone) == ["mine"]
    thief = optional_app.test_client()
    again = thief.get(path)
    assert again.status_code == 404 and "no longer works" in again.text

    sessions = laptop.get("/account")
    assert sessions.text.count('data-testid="session"') == 2
    with optional_app.app_context():
        accounts = get_accounts()
        account = accounts.by_username("ana")
        listed = accounts.sessions(account["id"])
        expired, _ = accounts.make_device_link(account_id=account["id"], owner_id=None, seconds=0)
    phone_session = next(s for s in listed if s["how"] == "device link")
    assert account_form(laptop, f"/account/sessions/{phone_session['id']}/revoke").status_code == 200
    assert titles(phone) == []  # signed out at its next request: a fresh anonymous visitor
    assert titles(laptop) == ["mine"]
    late = optional_app.test_client()
    assert late.get(f"/d/{expired}").status_code == 404


@both
def test_opening_someone_elses_device_link_hands_them_nothing(optional_app):
    mallory = optional_app.test_client()
    signup(mallory, "mallory")
    path = re.search(r'value="http://localhost(/d/[^"]+)"',
                     account_form(mallory, "/account/device-link").text).group(1)
    victim = optional_app.test_client()
    victim.post("/api/conversations", json={"title": "victim's secret"})
    victim.post("/api/keys", json={"name": "victim's key"})
    confirm = victim.get(path)
    assert "not moved" in confirm.text and "act as" in confirm.text
    assert victim.post(path, data={"csrf": csrf_of(confirm.text)}).status_code == 303
    assert titles(mallory) == [] and titles(victim) == []
    assert mallory.get("/api/keys").json["keys"] == []


def test_device_link_tokens_are_cut_in_request_logs():
    token = "Zx9" * 11
    line = redact(f'"GET /d/{token} HTTP/1.1" 200')
    assert token not in line and "/d/Zx9Zx9…" in line
    assert token not in redact(f"POST /d/{token}")


def test_device_link_with_accounts_off_carries_the_anonymous_identity(app):
    laptop = app.test_client()
    laptop.post("/api/conversations", json={"title": "no account needed"})
    page = account_form(laptop, "/account/device-link")
    assert "<svg" in page.text and "Sign in" not in page.text
    path = re.search(r'value="http://localhost(/d/[^"]+)"', page.text).group(1)
    phone = app.test_client()
    phone.post("/api/conversations", json={"title": "phone's own"})
    confirm = phone.get(path)
    assert "not moved" in confirm.text
    assert phone.post(path, data={"csrf": csrf_of(confirm.text)}).status_code == 303
    # The phone's own chats are not handed to whoever made the link: they stay behind.
    assert titles(phone) == ["no account needed"]
    assert titles(laptop) == ["no account needed"]
    assert app.test_client().get("/signin").status_code == 404  # no accounts, no sign-in


def test_disabling_signs_out_and_refuses_sign_in(optional_app):
    client = optional_app.test_client()
    signup(client, "eve")
    client.post("/api/conversations", json={"title": "eve's"})
    with optional_app.app_context():
        accounts = get_accounts()
        accounts.set_disabled(accounts.by_username("eve")["id"], True)
    assert titles(client) == []
    assert signin(optional_app.test_client(), "eve").status_code == 403
    with optional_app.app_context():
        accounts.set_disabled(accounts.by_username("eve")["id"], False)
    again = optional_app.test_client()
    assert signin(again, "eve").status_code == 303
    assert titles(again) == ["eve's"]


@both
def test_a_quota_refuses_the_next_reply_with_its_reset_time(make_app, make_live_server):
    app = make_app(ACCOUNTS="optional", MAX_TOKENS=8)
    server = make_live_server(app)
    with app.app_context():
        accounts = get_accounts()
        account = accounts.create("frank", PASSWORD)
    visitor = server.session()
    page = visitor.request("GET", "/signin")[2].decode()
    form = urllib.parse.urlencode({"csrf": csrf_of(page), "username": "frank",
                                   "password": PASSWORD}).encode()
    with visitor.opener.open(urllib.request.Request(server.url + "/signin", data=form),
                             timeout=30) as response:
        assert response.status == 200 and response.url == server.url + "/"  # followed the 303
    chat = visitor.ws()
    chat.chat("first, within the quota")
    done, frames = chat.until("done", "error")
    assert done["type"] == "done" and text_of(frames)
    used = accounts.tokens_today(account["owner_id"])
    assert used > 0
    # Deleting the chat resets nothing: its replies still count, for the quota and the admin.
    _status, listed = visitor.json("GET", "/api/conversations")
    (conversation,) = listed["conversations"]
    assert visitor.request("DELETE", f"/api/conversations/{conversation['id']}")[0] == 204
    assert visitor.json("GET", "/api/conversations")[1]["conversations"] == []
    assert accounts.tokens_today(account["owner_id"]) == used
    (row,) = accounts.usage(owner_id=account["owner_id"])
    assert row["replies"] == 1 and row["prompt_tokens"] + row["completion_tokens"] == used
    accounts.set_quota(account["id"], used, None)
    chat.chat("second, over it")
    refused, _ = chat.until("error", "done")
    assert refused["type"] == "error" and refused["code"] == "quota_exceeded"
    assert "resets at 00:00 UTC" in refused["message"]
    assert refused["resets_at"].endswith("T00:00:00.000Z") and refused["retry_after"] >= 1
    # A server benchmark is replies too: refused the same way, before any model runs.
    status, body = visitor.json("POST", "/api/benchmarks/server", {"tokens": 4})
    assert status == 429 and body["error"]["code"] == "quota_exceeded", body
    accounts.set_quota(account["id"], used + 10_000, 0)  # tokens left, but no replies at once
    chat.chat("third")
    refused, _ = chat.until("error", "done")
    assert refused["code"] == "quota_exceeded" and refused["quota"] == "replies_in_flight"
    chat.close()


def test_two_sends_at_once_cannot_both_pass_the_replies_quota(make_app):
    app = make_app(ACCOUNTS="optional")
    with app.app_context():
        accounts = get_accounts()
        account = accounts.create("gina", PASSWORD)
        accounts.set_quota(account["id"], None, 1)
        limits = app.extensions["bchat"].runs.limits
        owner = account["owner_id"]
        # Both sends are admitted before either takes its lease (two threads interleaved):
        # the cap must be checked where the lease is taken, under the limits' lock.
        first_cap, second_cap = accounts.admit(owner), accounts.admit(owner)
        with limits.take_replies(owner, "10.0.0.1", quota=first_cap):
            with pytest.raises(AppError) as refused:
                limits.take_replies(owner, "10.0.0.1", quota=second_cap)
        assert refused.value.code == "quota_exceeded"
        assert limits.held(f"replies|v|{owner}") == 0  # the refused one took nothing
        limits.take_replies(owner, "10.0.0.1", quota=second_cap).release()  # room again


def test_bchat_users_create_list_reset(tmp_path, tiny_model):
    import os

    db = tmp_path / "users.sqlite3"
    env = {**os.environ, "BCHAT_DATABASE_URL": f"sqlite:///{db}", "BCHAT_MODEL_PATH": str(tiny_model),
           "BCHAT_SECRET_KEY": "x"}

    def bchat(*args, stdin=""):
        return subprocess.run([sys.executable, "-m", "webapp.cli", *args], env=env, input=stdin,
                              capture_output=True, text=True, timeout=120)

    assert bchat("db", "upgrade").returncode == 0
    made = bchat("users", "create", "--admin", "Teacher", stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    assert "created admin teacher" in made.stdout and PASSWORD not in made.stdout + made.stderr
    short = bchat("users", "create", "kid", stdin="short\n")
    assert short.returncode == 1 and "at least 8" in short.stderr
    taken = bchat("users", "create", "teacher", stdin=PASSWORD + "\n")
    assert taken.returncode == 1 and "taken" in taken.stderr
    listed = bchat("users", "list")
    assert listed.returncode == 0 and re.search(r"^teacher\s+admin\s+active", listed.stdout, re.M)
    reset = bchat("users", "reset-password", "teacher", stdin="a new long password\n")
    assert reset.returncode == 0, reset.stderr
    missing = bchat("users", "reset-password", "nobody", stdin="a new long password\n")
    assert missing.returncode == 1 and "no such account" in missing.stderr


def test_an_admin_limits_the_models_users_may_use(make_app, tiny_model, tmp_path):
    for name in ("alpha", "beta"):
        (tmp_path / f"{name}.gguf").write_bytes(tiny_model.read_bytes())
    app = make_app(ACCOUNTS="optional", MODEL_PATH=str(tmp_path), MAX_TOKENS=4)
    with app.app_context():
        get_accounts().create("teacher", PASSWORD, role="admin")
        get_accounts().create("student", PASSWORD)
    admin, student, anonymous = app.test_client(), app.test_client(), app.test_client()
    signin(admin, "teacher")
    signin(student, "student")
    page = admin.get("/admin/")
    assert page.text.count('data-testid="user-model"') == 2
    saved = admin.post("/admin/models", data={"csrf": csrf_of(page.text), "model": ["alpha"]})
    assert saved.status_code == 303

    def listed(client):
        body = client.get("/api/models").json
        return sorted(m["id"] for m in body["models"]), body["default"]

    assert listed(student) == (["alpha"], "alpha")
    assert listed(anonymous) == (["alpha"], "alpha")
    assert listed(admin)[0] == ["alpha", "beta"]
    key = student.post("/api/keys", json={"name": "k"}).json["token"]

    def ask(model):
        return student.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": model, "messages": [{"role": "user", "content": "hi"}]})

    refused = ask("beta")
    assert refused.status_code == 403 and refused.json["error"]["code"] == "model_not_allowed"
    assert ask("alpha").status_code == 200
    # Every box ticked again: no limit, so a model added later is offered too.
    page = admin.get("/admin/")
    admin.post("/admin/models", data={"csrf": csrf_of(page.text), "model": ["alpha", "beta"]})
    assert listed(student)[0] == ["alpha", "beta"]
    with app.app_context():
        assert get_accounts().allowed_models("user") is None
        assert [e["action"] for e in get_accounts().audit_log()][:2] == ["models_set", "models_set"]


def test_passcode_then_sign_in_when_both_are_on(make_app):
    app = make_app(ACCOUNTS="required", PASSCODE="class of 2027")
    with app.app_context():
        get_accounts().create("ana", PASSWORD)
    client = app.test_client()
    first = client.get("/")
    assert first.status_code == 302 and "/passcode" in first.headers["Location"]
    form = client.get("/passcode")
    assert form.status_code == 200  # the sign-in gate lets the passcode form through
    entered = client.post("/passcode", data={"passcode": "class of 2027", "next": "/"})
    assert entered.status_code == 303
    second = client.get("/")
    assert second.status_code == 302 and "/signin" in second.headers["Location"]
    assert signin(client, "ana").status_code == 303
    assert client.get("/").status_code == 200  # the passcode stayed entered across sign-in


def test_changing_the_password_signs_out_the_other_browsers(optional_app):
    laptop, phone = optional_app.test_client(), optional_app.test_client()
    signup(laptop)
    signin(phone)
    wrong = account_form(laptop, "/account/password", current="not it at all", password="x" * 12)
    assert wrong.status_code == 403 and "wrong" in wrong.text
    done = account_form(laptop, "/account/password", current=PASSWORD, password="a brand new one")
    assert done.status_code == 200 and "other browsers are signed out" in done.text
    assert titles(laptop) == [] and "Signed in as" in laptop.get("/account").text
    assert "Signed in as" not in phone.get("/account").text
    assert signin(optional_app.test_client(), "ana", PASSWORD).status_code == 403
    assert signin(optional_app.test_client(), "ana", "a brand new one").status_code == 303


@both
def test_a_password_change_or_a_revoke_kills_the_device_links(optional_app):
    laptop, thief = optional_app.test_client(), optional_app.test_client()
    signup(laptop)
    signin(thief)

    def link_from(client):
        page = account_form(client, "/account/device-link")
        return re.search(r'value="http://localhost(/d/[^"]+)"', page.text).group(1)

    stashed = link_from(thief)  # made before the owner noticed
    done = account_form(laptop, "/account/password", current=PASSWORD, password="a brand new one")
    assert done.status_code == 200
    assert optional_app.test_client().get(stashed).status_code == 404
    with optional_app.app_context():
        accounts = get_accounts()
        account = accounts.by_username("ana")
        stashed, _ = accounts.make_device_link(account_id=account["id"], owner_id=None, seconds=300)
        (current,) = accounts.sessions(account["id"])
        accounts.revoke_session(account["id"], current["id"])
    assert optional_app.test_client().get(f"/d/{stashed}").status_code == 404


@both
def test_admin_actions_through_the_page_and_the_usage_csv(make_app):
    from webapp.models import Conversation, Message

    app = make_app(ACCOUNTS="optional")
    with app.app_context():
        accounts = get_accounts()
        accounts.create("teacher", PASSWORD, role="admin")
        gus_owner = accounts.create("gus", PASSWORD)["owner_id"]
        with accounts.db.write() as session:  # replies to count, one by a hostile model name
            conv = Conversation(owner_id=gus_owner, title="t")
            session.add(conv)
            session.flush()
            session.add_all([Message(conversation_id=conv.id, role="assistant", content="a",
                                     engine=engine, model=model, prompt_tokens=10,
                                     completion_tokens=5)
                             for engine, model in (("server", "=HYPERLINK(1)"), ("browser", "m"))])
    admin = app.test_client()
    signin(admin, "teacher")

    def act(path, **fields):
        page = admin.get("/admin/")
        return admin.post(path, data={"csrf": csrf_of(page.text), **fields})

    assert admin.post("/admin/users", data={"username": "x", "password": PASSWORD}).status_code == 403
    assert act("/admin/users", username="Hana", password=PASSWORD).status_code == 303
    with app.app_context():
        hana, gus = accounts.by_username("hana"), accounts.by_username("gus")
    student = app.test_client()
    assert signin(student, "hana").status_code == 303

    assert act("/admin/quota", tokens_per_day="5000", replies_in_flight="").status_code == 303
    assert act(f"/admin/users/{hana['id']}/quota", tokens_per_day="abc").status_code == 400
    assert act(f"/admin/users/{hana['id']}/disabled", disabled="1").status_code == 404
    assert act(f"/admin/users/{hana['id']}/disable", disabled="1").status_code == 303
    assert "Signed in as" not in student.get("/account").text
    assert act(f"/admin/users/{hana['id']}/disable", disabled="0").status_code == 303
    assert act(f"/admin/users/{hana['id']}/password", password="set by the teacher").status_code == 303
    assert signin(app.test_client(), "hana", "set by the teacher").status_code == 303
    assert act(f"/admin/users/{hana['id']}/role", role="admin").status_code == 303
    me = accounts.by_username("teacher")["id"]
    assert act(f"/admin/users/{me}/disable", disabled="1").status_code == 400  # not oneself

    csv_text = admin.get("/admin/usage.csv")
    assert csv_text.status_code == 200 and csv_text.mimetype == "text/csv"
    lines = csv_text.text.strip().splitlines()
    assert lines[0] == "day,user,engine,model,replies,prompt_tokens,completion_tokens"
    assert any(",gus,server,'=HYPERLINK(1),1,10,5" in line for line in lines)  # not a formula
    assert any(",gus,browser,m,1,10,5" in line for line in lines)
    page = admin.get("/admin/")
    assert "+ 1 in the browser" in page.text

    assert act(f"/admin/users/{gus['id']}/delete", confirm="wrong").status_code == 400
    assert act(f"/admin/users/{gus['id']}/delete", confirm="gus").status_code == 303
    with app.app_context():
        assert [a["username"] for a in accounts.list()] == ["hana", "teacher"]
        assert accounts.usage(owner_id=gus["owner_id"]) == []
        assert accounts.default_quota() == {"tokens_per_day": 5000, "replies_in_flight": None}
        actions = [e["action"] for e in accounts.audit_log()]
    for action in ("user_created", "default_quota_set", "user_disabled", "user_enabled",
                   "password_reset", "role_set", "usage_exported", "user_deleted"):
        assert action in actions, action
    assert PASSWORD not in repr(accounts.audit_log()) and "set by the teacher" not in repr(
        accounts.audit_log())


def signed_in_visitor(server, username: str):
    visitor = server.session()
    page = visitor.request("GET", "/signin")[2].decode()
    form = urllib.parse.urlencode({"csrf": csrf_of(page), "username": username,
                                   "password": PASSWORD}).encode()
    with visitor.opener.open(urllib.request.Request(server.url + "/signin", data=form),
                             timeout=30) as response:
        assert response.status == 200 and response.url == server.url + "/"
    return visitor


def test_a_revoked_session_ends_its_open_socket(make_app, make_live_server, monkeypatch):
    """A socket outlives the handshake that checked its session: revoking the session (or
    disabling the account) ends it at its next frame, or within the idle check while it only
    listens, with an error frame that says so."""
    import websocket

    monkeypatch.setattr("webapp.socket.SESSION_CHECK_SECONDS", 0.2)
    app = make_app(ACCOUNTS="optional")
    server = make_live_server(app)
    with app.app_context():
        accounts = get_accounts()
        account = accounts.create("hal", PASSWORD)
    laptop, phone = signed_in_visitor(server, "hal"), signed_in_visitor(server, "hal")
    listening, talking = laptop.ws(), phone.ws()
    talking.send({"type": "ping"})
    assert talking.until("pong", "error")[0]["type"] == "pong"
    for session in accounts.sessions(account["id"]):
        accounts.revoke_session(account["id"], session["id"])
    # the listening one, idle, finds out by itself; the talking one at its next frame
    talking.send({"type": "chat", "conversation_id": None, "content": "still me?"})
    for socket in (listening, talking):
        refused, frames = socket.until("error", "started")
        assert refused["type"] == "error" and refused["code"] == "signed_out", frames
        with pytest.raises((websocket.WebSocketConnectionClosedException, ValueError)):
            socket.recv()  # closed: no frame follows
    assert laptop.json("GET", "/api/conversations")[1]["conversations"] == []
    with app.app_context():
        assert accounts.tokens_today(account["owner_id"]) == 0  # the chat never started
