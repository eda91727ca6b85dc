"""A small OpenID Connect provider the tests start themselves, built on Authlib's JOSE library
(joserfc): discovery, an authorization endpoint that signs in one configured person without a
form, a token endpoint (client secret, PKCE, each code once) and the JWKS. ``audience`` lets a
test make it issue ID tokens for another client."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from urllib.parse import urlencode

from flask import Flask, abort, jsonify, redirect, request
from joserfc import jwt
from joserfc.jwk import RSAKey

CLIENT_ID = "bchat-test"
CLIENT_SECRET = "s3cret-for-tests"


def make_provider(user: dict) -> Flask:
    app = Flask("oidc_provider")
    key = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig", "alg": "RS256"})
    codes: dict[str, dict] = {}
    app.config.update(TOKEN_ISSUER=None, AUDIENCE=CLIENT_ID, USER=user, TOKEN_CALLS=[])

    def issuer() -> str:
        return request.host_url.rstrip("/")

    @app.get("/.well-known/openid-configuration")
    def discovery():
        base = issuer()
        return jsonify({
            "issuer": base, "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token", "jwks_uri": f"{base}/jwks",
            "response_types_supported": ["code"], "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"], "scopes_supported": ["openid", "profile"],
        })

    @app.get("/jwks")
    def jwks():
        return jsonify({"keys": [key.as_dict(private=False)]})

    @app.get("/authorize")
    def authorize():
        args = request.args
        if args.get("client_id") != CLIENT_ID or args.get("response_type") != "code":
            abort(400)
        code = secrets.token_urlsafe(16)
        codes[code] = {"redirect_uri": args["redirect_uri"], "nonce": args.get("nonce"),
                       "challenge": args.get("code_challenge")}
        return redirect(f"{args['redirect_uri']}?{urlencode({'code': code, 'state': args['state']})}")

    @app.post("/token")
    def token():
        form = request.form
        app.config["TOKEN_CALLS"].append(form.get("code"))
        auth = request.authorization
        client_id = auth.username if auth else form.get("client_id")
        secret = auth.password if auth else form.get("client_secret")
        if client_id != CLIENT_ID or secret != CLIENT_SECRET:
            return jsonify({"error": "invalid_client"}), 401
        grant = codes.pop(form.get("code", ""), None)  # each code once
        if grant is None or grant["redirect_uri"] != form.get("redirect_uri"):
            return jsonify({"error": "invalid_grant"}), 400
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
        if grant["challenge"] and digest.decode() != grant["challenge"]:
            return jsonify({"error": "invalid_grant", "error_description": "PKCE"}), 400
        now = int(time.time())
        claims = {"iss": app.config["TOKEN_ISSUER"] or issuer(), "sub": app.config["USER"]["sub"],
                  "aud": app.config["AUDIENCE"],
                  "iat": now, "exp": now + 300, "nonce": grant["nonce"],
                  "preferred_username": app.config["USER"].get("preferred_username")}
        id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)
        return jsonify({"access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
                        "expires_in": 300, "id_token": id_token})

    return app
