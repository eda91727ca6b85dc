"""Sharing in chromium: the owner shares, a second visitor opens the link, continues, chats."""

from __future__ import annotations

import pytest
from browser import chromium_browser
from playwright.sync_api import expect

pytestmark = pytest.mark.browser


def test_share_open_continue_chat(make_app, make_live_server):
    server = make_live_server(make_app(MAX_TOKENS=16))
    with chromium_browser() as browser:
        owner = browser.new_context().new_page()
        owner.goto(server.url + "/")
        expect(owner.get_by_test_id("connection")).to_have_text("connected")
        owner.get_by_test_id("composer").fill("Shared **question**")
        owner.get_by_test_id("composer").press("Enter")
        reply = owner.locator('[data-role="assistant"]').first
        expect(reply).to_have_attribute("data-status", "complete")
        owner.get_by_test_id("share").click()
        url = owner.get_by_test_id("share-url")
        expect(url).not_to_have_value("")
        link = url.input_value()
        assert link.startswith(server.url + "/s/")
        expect(owner.get_by_test_id("conversation").first).to_have_attribute("data-shared", "true")
        expect(owner.get_by_test_id("share-item")).to_have_count(1)

        # a second visitor, with no cookies of the owner's
        visitor = browser.new_context().new_page()
        visitor.goto(link)
        expect(visitor.get_by_test_id("shared-title")).to_have_text("Shared **question**")
        messages = visitor.get_by_test_id("message")
        expect(messages).to_have_count(2)
        expect(messages.nth(0).locator(".body")).to_have_text("Shared **question**")  # as typed
        expect(visitor.get_by_test_id("provenance")).to_contain_text("tiny-chat")
        expect(visitor.get_by_test_id("provenance")).to_contain_text("F32")
        assert visitor.get_by_test_id("composer").count() == 0
        visitor.get_by_test_id("continue").click()
        visitor.wait_for_url("**/c/**")
        expect(visitor.get_by_test_id("connection")).to_have_text("connected")
        expect(visitor.get_by_test_id("message")).to_have_count(2)
        visitor.get_by_test_id("composer").fill("my follow-up")
        visitor.get_by_test_id("composer").press("Enter")
        expect(visitor.locator('[data-role="assistant"]').nth(1)).to_have_attribute(
            "data-status", "complete"
        )
        expect(visitor.get_by_test_id("conversation")).to_have_count(1)

        # the owner's conversation is untouched; revoking from the list kills the link
        owner.reload()
        expect(owner.get_by_test_id("message")).to_have_count(2)
        owner.get_by_test_id("revoke").click()
        expect(owner.get_by_test_id("share-item")).to_have_count(0)
        response = visitor.goto(link)
        assert response.status == 404
