"""The OpenAPI document is true: it lists every API route, and the app keeps to it.

schemathesis generates requests from /api/openapi.json and sends them to the Flask app in
process (WSGI, no server): no answer may be a 5xx, and every status code, content type and
body must be one the document promises.
"""

from __future__ import annotations

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from webapp import api
from webapp.openapi import document

OPENAPI = document()

EXAMPLES_PER_OPERATION = 25


def test_every_api_route_is_documented(app):
    documented = {
        (path, method.upper())
        for path, item in OPENAPI["paths"].items()
        for method in item
        if method != "parameters"
    }
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.split(".", 1)[0] != api.bp.name:
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        routes |= {(path, method) for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes, "api.bp has routes"
    assert routes - documented == set(), "routes missing from webapp/openapi.py"
    assert documented - routes == set(), "documented operations the app does not have"


def test_the_document_is_served(client):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200 and response.get_json()["openapi"].startswith("3.")


OPERATIONS = [
    (path, method.upper())
    for path, item in OPENAPI["paths"].items()
    for method in item
    if method != "parameters"
]


# schemathesis' own pytest plugin (from_fixture + parametrize) breaks on pytest 9
# ('Function' object has no attribute '_nodeid'), so each operation's strategy is run here
# with hypothesis directly: the same generated cases and the same checks.
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_api_keeps_to_its_document(app, path, method):
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    # Strings never hold NUL: every JSON body refuses it (bad_text; PostgreSQL cannot store it).
    schema.config.generation.update(allow_x00=False)
    operation = schema[path][method]
    calls = []

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call_and_validate()
        calls.append(response.status_code)

    check()
    assert calls, "schemathesis generated no request"
    assert all(code < 500 for code in calls)
