"""Accounts in a real chromium: chat anonymously, sign up (the chats stay), a second browser
signs in through the device link, revoke and sign out; an admin's quota refuses the next chat
with its reset time; the admin page is 404 to a user. Screenshots of the pages."""

from __future__ import annotations

import pytest

from webapp.accounts import get_accounts
from webapp.models import Conversation, Message

pytestmark = pytest.mark.browser

PASSWORD = "correct horse battery"


@pytest.fixture
def server(make_app, make_live_server):
    return make_live_server(make_app(ACCOUNTS="optional", MAX_TOKENS=8))


def chat_once(page, text):
    from playwright.sync_api import expect

    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("composer").press("Enter")
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(reply).to_have_attribute("data-status", "complete", timeout=60_000)


def sign_in(page, url, username):
    page.goto(url + "/signin")
    page.get_by_test_id("username").fill(username)
    page.get_by_test_id("password").fill(PASSWORD)
    page.get_by_test_id("signin-submit").click()
    page.wait_for_url(url + "/")


def test_sign_up_device_link_revoke_sign_out_and_quota(server, pages):
    from playwright.sync_api import expect

    url = server.url
    laptop = pages()
    laptop.goto(url + "/")
    expect(laptop.get_by_test_id("connection")).to_have_text("connected")
    chat_once(laptop, "hello before any account")
    expect(laptop.get_by_test_id("conversation")).to_have_count(1)

    # Sign up from the account corner: the chat is still there afterwards.
    laptop.get_by_test_id("account-link").click()
    laptop.get_by_test_id("account-signup").click()
    laptop.get_by_test_id("username").fill("ana")
    laptop.get_by_test_id("password").fill(PASSWORD)
    laptop.get_by_test_id("password2").fill(PASSWORD)
    laptop.get_by_test_id("signup-submit").click()
    laptop.wait_for_url(url + "/")
    expect(laptop.get_by_test_id("conversation")).to_have_count(1)
    expect(laptop.get_by_test_id("conversation")).to_contain_text("hello before any account")
    expect(laptop.get_by_test_id("account-link")).to_have_text("ana")

    # Use on another device: a second browser opens the one-time link and sees the same chats.
    laptop.get_by_test_id("account-link").click()
    expect(laptop.get_by_test_id("account-name")).to_have_text("ana")
    laptop.get_by_test_id("make-device-link").click()
    expect(laptop.get_by_test_id("device-qr").locator("svg")).to_be_visible()
    link = laptop.get_by_test_id("device-link").input_value()
    assert "/d/" in link
    phone = pages({"width": 390, "height": 844})
    phone.goto(link)
    phone.get_by_test_id("device-confirm").click()
    phone.wait_for_url(url + "/")
    phone.get_by_test_id("sidebar-toggle").click()
    expect(phone.get_by_test_id("conversation")).to_have_count(1)
    expect(phone.get_by_test_id("conversation")).to_contain_text("hello before any account")
    other = pages()
    other.goto(link)  # used: nobody else gets in with it
    expect(other.get_by_test_id("device-gone")).to_be_visible()

    # The sessions list shows both browsers; revoking the phone signs it out.
    laptop.reload()
    sessions = laptop.get_by_test_id("session")
    expect(sessions).to_have_count(2)
    sessions.filter(has_not=laptop.get_by_test_id("this-session")).get_by_test_id("revoke-session").click()
    expect(laptop.get_by_test_id("account-message")).to_contain_text("signed out")
    expect(laptop.get_by_test_id("session")).to_have_count(1)
    phone.reload()
    phone.get_by_test_id("sidebar-toggle").click()
    expect(phone.get_by_test_id("conversation")).to_have_count(0)

    # The admin page is not there for a user.
    response = laptop.goto(url + "/admin/")
    assert response.status == 404

    # Sign out: this browser is a new anonymous visitor with no chats.
    laptop.goto(url + "/account")
    laptop.get_by_test_id("signout").click()
    laptop.wait_for_url(url + "/")
    expect(laptop.get_by_test_id("connection")).to_have_text("connected")
    expect(laptop.get_by_test_id("conversation")).to_have_count(0)

    # An admin sets ana's quota to the tokens she has used: her next chat is refused.
    with server.app.app_context():
        accounts = get_accounts()
        accounts.create("teacher", PASSWORD, role="admin")
        used = accounts.tokens_today(accounts.by_username("ana")["owner_id"])
    assert used > 0
    admin = pages()
    sign_in(admin, url, "teacher")
    admin.goto(url + "/admin/")
    row = admin.locator('[data-testid="user-row"][data-username="ana"]')
    expect(row).to_contain_text("1 reply")
    row.get_by_test_id("quota-tokens").fill(str(used))
    row.get_by_test_id("quota-save").click()
    expect(admin.get_by_test_id("admin-message")).to_contain_text("Quota of ana saved")
    expect(admin.get_by_test_id("audit-log")).to_contain_text("quota set")

    sign_in(laptop, url, "ana")
    expect(laptop.get_by_test_id("connection")).to_have_text("connected")
    laptop.get_by_test_id("composer").fill("one more, please")
    laptop.get_by_test_id("composer").press("Enter")
    expect(laptop.get_by_test_id("error-text")).to_contain_text("resets at 00:00 UTC")


def test_screenshots(server, pages, shots):
    from playwright.sync_api import expect

    url = server.url
    with server.app.app_context():
        accounts = get_accounts()
        accounts.create("teacher", PASSWORD, role="admin")
        for name in ("ana", "ben", "chloe"):
            accounts.create(name, PASSWORD)
        accounts.set_quota(accounts.by_username("ben")["id"], 20000, 2)
        # Some replies to count: server replies with tokens, and one written in a browser.
        with accounts.db.write() as session:
            for name, replies in (("ana", 3), ("ben", 12)):
                conv = Conversation(owner_id=accounts.by_username(name)["owner_id"], title="usage")
                session.add(conv)
                session.flush()
                for i in range(replies):
                    session.add(Message(conversation_id=conv.id, role="assistant", content="…",
                                        engine="browser" if i == 0 else "server",
                                        model="SmolLM2-135M-Instruct", prompt_tokens=120 + i,
                                        completion_tokens=200))
    for viewport, size in (({"width": 1366, "height": 850}, "wide"),
                           ({"width": 390, "height": 844}, "phone")):
        for scheme in ("light", "dark"):
            page = pages(viewport, scheme)
            page.goto(url + "/signin")
            page.get_by_test_id("username").fill("teacher")
            page.screenshot(path=shots / f"signin-{size}-{scheme}.png")
            page.get_by_test_id("password").fill(PASSWORD)
            page.get_by_test_id("signin-submit").click()
            page.wait_for_url(url + "/")
            expect(page.get_by_test_id("connection")).to_have_text("connected")
            if size == "phone":  # the account entry is in the conversation drawer
                page.get_by_test_id("sidebar-toggle").click()
                expect(page.get_by_test_id("account-link")).to_be_visible()
                page.wait_for_function(  # the drawer has slid all the way in
                    "() => getComputedStyle(document.getElementById('sidebar')).transform === 'none'")
            page.screenshot(path=shots / f"chat-signed-in-{size}-{scheme}.png")
            page.goto(url + "/account")
            page.get_by_test_id("make-device-link").click()
            expect(page.get_by_test_id("device-qr")).to_be_visible()
            page.screenshot(path=shots / f"account-{size}-{scheme}.png", full_page=True)
            page.goto(url + "/admin/")
            expect(page.get_by_test_id("user-row")).to_have_count(4)
            page.screenshot(path=shots / f"admin-{size}-{scheme}.png", full_page=True)


def test_device_link_without_accounts(make_app, make_live_server, pages, shots):
    """Accounts off: the person icon is "Use on another device", and the link carries this
    browser's anonymous chats to the phone."""
    from playwright.sync_api import expect

    url = make_live_server(make_app(MAX_TOKENS=8)).url
    laptop = pages()
    laptop.goto(url + "/")
    expect(laptop.get_by_test_id("connection")).to_have_text("connected")
    chat_once(laptop, "no account needed")
    expect(laptop.get_by_test_id("account-link")).to_have_text("Use on another device")
    laptop.get_by_test_id("account-link").click()
    laptop.get_by_test_id("make-device-link").click()
    link = laptop.get_by_test_id("device-link").input_value()
    laptop.screenshot(path=shots / "device-link-no-accounts-wide-light.png", full_page=True)
    phone = pages({"width": 390, "height": 844}, "dark")
    phone.goto(link)
    phone.screenshot(path=shots / "device-confirm-phone-dark.png")
    phone.get_by_test_id("device-confirm").click()
    phone.wait_for_url(url + "/")
    phone.get_by_test_id("sidebar-toggle").click()
    expect(phone.get_by_test_id("conversation")).to_contain_text("no account needed")
