"""Signing in with OpenID Connect against a provider the tests start themselves
(tests/oidc_provider.py, on a real socket): login, a wrong audience, a replayed code."""

from __future__ import annotations

import pytest
import requests
from oidc_provider import CLIENT_ID, CLIENT_SECRET, make_provider

from webapp.accounts import get_accounts


@pytest.fixture
def provider(make_live_server):
    return make_live_server(make_provider({"sub": "s-123",
                                           "preferred_username": "Ana.Lima@school.example"}))


@pytest.fixture
def school(make_app, provider):
    return make_app(ACCOUNTS="optional", OIDC_ISSUER=provider.url, OIDC_CLIENT_ID=CLIENT_ID,
                    OIDC_CLIENT_SECRET=CLIENT_SECRET, OIDC_NAME="Test School")


def callback_url(client) -> str:
    """Start the sign-in, let the provider answer as the browser would see it: our callback
    path with its code and state."""
    start = client.get("/signin/oidc?next=/")
    assert start.status_code == 302
    back = requests.get(start.headers["Location"], allow_redirects=False, timeout=30)
    assert back.status_code == 302
    location = back.headers["Location"]
    assert "/signin/oidc/callback?code=" in location
    return location.split("localhost", 1)[1]


def signed_in_as(client) -> str | None:
    page = client.get("/account").text
    marker = 'data-testid="account-name">'
    return page.split(marker, 1)[1].split("<", 1)[0] if marker in page else None


def test_login_makes_an_account_once_and_keeps_the_chats(school):
    client = school.test_client()
    page = client.get("/signin")
    assert "Sign in with Test School" in page.text
    client.post("/api/conversations", json={"title": "before school sign-in"})
    done = client.get(callback_url(client))
    assert done.status_code == 303 and done.headers["Location"] == "/"
    assert signed_in_as(client) == "ana.lima"
    titles = [c["title"] for c in client.get("/api/conversations").json["conversations"]]
    assert titles == ["before school sign-in"]
    again = school.test_client()
    assert again.get(callback_url(again)).status_code == 303
    assert signed_in_as(again) == "ana.lima"  # the same identity, the same account
    with school.app_context():
        accounts = get_accounts()
        assert [a["username"] for a in accounts.list()] == ["ana.lima"]
        assert accounts.list()[0]["has_password"] is False
        assert accounts.sessions(accounts.list()[0]["id"])[0]["how"] == "oidc"


def test_an_id_token_for_another_client_signs_no_one_in(school, provider):
    provider.app.config["AUDIENCE"] = "some-other-app"
    client = school.test_client()
    refused = client.get(callback_url(client))
    assert refused.status_code == 403
    assert "did not work" in refused.text
    assert signed_in_as(client) is None
    with school.app_context():
        accounts = get_accounts()
        assert accounts.list() == []
        failed = accounts.audit_log()[0]
    assert failed["action"] == "sign_in_failed" and failed["detail"]["how"] == "oidc"


def test_another_issuer_signs_no_one_in(school, provider):
    provider.app.config["TOKEN_ISSUER"] = "https://evil.example"  # discovery names another
    client = school.test_client()
    assert client.get(callback_url(client)).status_code == 403
    assert signed_in_as(client) is None


def test_a_replayed_code_signs_no_one_in(school, provider):
    client = school.test_client()
    path = callback_url(client)
    assert client.get(path).status_code == 303
    calls = len(provider.app.config["TOKEN_CALLS"])
    # The same callback URL again: in the browser that used it, and in another one (a URL
    # seen in a log or a history). Its state is used up, so the code is never even sent.
    for replayer in (client, school.test_client()):
        assert replayer.get(path).status_code == 403
    thief = school.test_client()
    assert signed_in_as(thief) is None
    assert len(provider.app.config["TOKEN_CALLS"]) == calls
    # And the provider itself takes each code once.
    code = path.split("code=", 1)[1].split("&", 1)[0]
    reused = requests.post(provider.url + "/token", timeout=30, auth=(CLIENT_ID, CLIENT_SECRET),
                           data={"grant_type": "authorization_code", "code": code,
                                 "redirect_uri": "http://localhost/signin/oidc/callback"})
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"


def test_no_oidc_routes_without_an_issuer(make_app):
    client = make_app(ACCOUNTS="optional").test_client()
    assert client.get("/signin/oidc").status_code == 404
    assert "Sign in with" not in client.get("/signin").text


def test_admin_only_signup_refuses_an_unknown_identity_until_an_admin_links_it(make_app, provider):
    school = make_app(ACCOUNTS="optional", SIGNUP="admin", OIDC_ISSUER=provider.url,
                      OIDC_CLIENT_ID=CLIENT_ID, OIDC_CLIENT_SECRET=CLIENT_SECRET,
                      OIDC_NAME="Test School")
    client = school.test_client()
    refused = client.get(callback_url(client))
    assert refused.status_code == 403
    assert "only an admin makes accounts" in refused.text
    identity = f"{provider.url}|s-123"
    assert identity in refused.text  # what the person hands to the admin
    assert signed_in_as(client) is None
    with school.app_context():
        accounts = get_accounts()
        assert accounts.list() == []
        accounts.create("ana", "correct horse battery")
        accounts.link_oidc("ana", identity)
    again = school.test_client()
    assert again.get(callback_url(again)).status_code == 303
    assert signed_in_as(again) == "ana"
