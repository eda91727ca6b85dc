"""Signing in with a school's OpenID Connect provider (BCHAT_OIDC_*), through Authlib's Flask
client: the authorization-code flow with PKCE, a state and a nonce kept in the cookie, and the
ID token's signature (the provider's JWKS), issuer, audience (our client id), expiry and nonce
checked before anyone is signed in. The state is used up by the first callback, so a replayed
callback URL (a code seen in a log or a browser history) signs no one in."""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app

EXTENSION_KEY = "bchat.oidc"


def init_app(app: Flask) -> None:
    config = app.config
    if config["ACCOUNTS"] == "off" or not config.get("OIDC_ISSUER"):
        return
    if not config.get("OIDC_CLIENT_ID"):
        raise ValueError("BCHAT_OIDC_ISSUER is set without BCHAT_OIDC_CLIENT_ID")
    from authlib.integrations.flask_client import OAuth

    oauth = OAuth(app)
    issuer = config["OIDC_ISSUER"].rstrip("/")
    oauth.register(
        "school",
        client_id=config["OIDC_CLIENT_ID"],
        client_secret=config.get("OIDC_CLIENT_SECRET"),
        server_metadata_url=f"{issuer}/.well-known/openid-configuration",
        client_kwargs={"scope": "openid profile", "code_challenge_method": "S256",
                       "timeout": 10},
    )
    app.extensions[EXTENSION_KEY] = oauth


def enabled() -> bool:
    return EXTENSION_KEY in current_app.extensions


def provider_name() -> str:
    return current_app.config["OIDC_NAME"]


def client() -> Any:
    return current_app.extensions[EXTENSION_KEY].school


def identity(claims: dict[str, Any]) -> tuple[str, str]:
    """("issuer|sub", the username wanted) from validated ID-token claims."""
    subject = f"{claims['iss']}|{claims['sub']}"
    wanted = claims.get(current_app.config["OIDC_USERNAME_CLAIM"]) or claims["sub"]
    return subject, str(wanted)
