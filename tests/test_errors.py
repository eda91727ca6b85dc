"""One error type, two dialects: /v1 answers in OpenAI's (its codes, types and ``param``), the
JSON API in bchat's, from the same AppError."""

from __future__ import annotations

import pytest

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def v1(app):
    client = app.test_client()
    client.get("/")
    token = client.post("/api/keys", json={"name": "t"}).get_json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    return client, lambda body: client.post("/v1/chat/completions", headers=auth, json=body)


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"model": "no-such-model", "messages": USER}, 404, "model_not_found", None),
    ({"model": "tiny-chat"}, 400, "missing_required_parameter", "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value", "messages[0].role"),
    ({"messages": USER, "temperature": 5}, 400, "invalid_value", "temperature"),
    ({"messages": USER, "n": 5}, 400, "invalid_value", "n"),  # above BCHAT_MAX_N
    ({"messages": USER, "stop": ["a"] * 5}, 400, "invalid_value", "stop"),
])
def test_v1_errors_use_openai_codes_and_name_the_param(v1, body, status, code, param):
    _client, post = v1
    response = post(body)
    assert response.status_code == status, response.data[:300]
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["type"], error["param"]) == (code, "invalid_request_error", param)
    assert error["message"]


def test_the_json_api_keeps_bchats_dialect(v1):
    client, _post = v1
    conversation = client.post("/api/conversations", json={}).get_json()
    response = client.patch(f"/api/conversations/{conversation['id']}",
                            json={"settings": {"temperature": 5}})
    assert response.status_code == 400
    assert set(response.get_json()["error"]) == {"code", "message"}
    assert response.get_json()["error"]["code"] == "bad_settings"
    missing = client.get("/api/conversations/nope")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    # Werkzeug's own errors take each path's dialect too
    assert set(client.get("/api/nowhere").get_json()["error"]) == {"code", "message"}
    openai = client.get("/v1/nowhere").get_json()["error"]
    assert openai["type"] == "invalid_request_error" and openai["code"] == "not_found"
    page = client.get("/nowhere", headers={"Accept": "text/html"})
    assert page.status_code == 404 and page.mimetype == "text/html"
