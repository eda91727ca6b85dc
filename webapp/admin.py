"""The admin page (accounts on, admins only; 404 to anyone else, so it cannot be found by
probing): users and their usage, quotas, disabling and deleting, new accounts and passwords,
a usage CSV and the audit log. Every action is a form with a CSRF token, and is logged."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from typing import Any

from flask import Blueprint, Response, abort, current_app, redirect, render_template, request, url_for

from .accounts import get_accounts
from .errors import AppError
from .models import utcnow
from .security import check_form_token, current_account, form_token
from .services import get_services

bp = Blueprint("admin", __name__, url_prefix="/admin")

USAGE_DAYS = 30


@bp.before_request
def _admins_only():
    if current_app.config["ACCOUNTS"] == "off":
        abort(404)
    account = current_account()
    if account is None or account["role"] != "admin":
        abort(404)


def _summaries(usage: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per owner: today's and the last 7 days' replies and tokens, browser replies apart."""
    today = utcnow().date().isoformat()
    week = (utcnow().date().toordinal() - 6)
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in usage:
        day = row["day"][:10]
        spans = ["week"] if _ordinal(day) >= week else []
        if day == today:
            spans.append("today")
        for span in spans:
            s = out[row["owner_id"]]
            if row["engine"] == "browser":
                s[f"{span}_browser_replies"] += row["replies"]
            else:
                s[f"{span}_replies"] += row["replies"]
                s[f"{span}_tokens"] += row["prompt_tokens"] + row["completion_tokens"]
    return out


def _ordinal(day: str) -> int:
    from datetime import date

    try:
        return date.fromisoformat(day).toordinal()
    except ValueError:
        return 0


def _actor() -> str:
    return current_account()["username"]


def _log(action: str, target: str | None, **detail: Any) -> None:
    get_accounts().audit(action, actor=_actor(), target=target, address=request.remote_addr,
                         detail=detail or None)


@bp.get("/", strict_slashes=False)  # "/admin" too: a redirect to "/admin/" told anyone it exists
def index():
    accounts = get_accounts()
    users = accounts.list()
    usage = accounts.usage(USAGE_DAYS)
    summaries = _summaries(usage)
    owners = {u["owner_id"] for u in users}
    anonymous: dict[str, int] = defaultdict(int)
    for owner, s in summaries.items():
        if owner not in owners:
            for k, v in s.items():
                anonymous[k] += v
    models = [m.id for m in get_services().engines.models()]
    allowed = accounts.allowed_models("user")
    return render_template("admin.html", users=users, summaries=summaries, anonymous=anonymous,
                           models=models, user_models=models if allowed is None else allowed,
                           default=accounts.default_quota(), audit=accounts.audit_log(),
                           csrf=form_token("admin"), me=current_account(),
                           message=request.args.get("done"), mode=current_app.config["ACCOUNTS"])


@bp.get("/users/<user_id>")
def user(user_id: str):
    accounts = get_accounts()
    account = accounts.get(user_id)
    return render_template("admin_user.html", user=account, csrf=form_token("admin"),
                           usage=accounts.usage(USAGE_DAYS, account["owner_id"]),
                           default=accounts.default_quota(),
                           tokens_today=accounts.tokens_today(account["owner_id"]))


def _done(message: str):
    return redirect(url_for("admin.index", done=message), code=303)


def _form() -> dict[str, str]:
    check_form_token("admin", request.form.get("csrf"))
    return request.form


@bp.post("/users")
def create_user():
    form = _form()
    role = "admin" if form.get("admin") else "user"
    account = get_accounts().create(form.get("username"), form.get("password"), role=role)
    _log("user_created", account["username"], role=role)
    return _done(f"Created {account['username']}.")


@bp.post("/users/<user_id>/quota")
def set_quota(user_id: str):
    form = _form()
    account = get_accounts().set_quota(user_id, form.get("tokens_per_day"),
                                       form.get("replies_in_flight"))
    _log("quota_set", account["username"], tokens_per_day=account["tokens_per_day"],
         replies_in_flight=account["replies_in_flight"])
    return _done(f"Quota of {account['username']} saved.")


@bp.post("/quota")
def set_default_quota():
    form = _form()
    value = get_accounts().set_default_quota(form.get("tokens_per_day"), form.get("replies_in_flight"))
    _log("default_quota_set", None, **value)
    return _done("Default quota saved.")


@bp.post("/models")
def set_models():
    """Which models the user role may use (admins use all): every box ticked = no limit, so a
    model added later is offered too."""
    form = _form()
    offered = [m.id for m in get_services().engines.models()]
    chosen = [m for m in form.getlist("model") if m in offered]
    get_accounts().set_allowed_models("user", None if set(chosen) == set(offered) else chosen)
    _log("models_set", "user", models=chosen if set(chosen) != set(offered) else "all")
    return _done("Models for users saved.")


@bp.post("/users/<user_id>/disable")
def disable(user_id: str):
    form = _form()
    disabled = form.get("disabled") == "1"
    accounts = get_accounts()
    if user_id == current_account()["id"]:
        raise AppError("own_account", "you cannot disable your own account here")
    account = accounts.set_disabled(user_id, disabled)
    _log("user_disabled" if disabled else "user_enabled", account["username"])
    return _done(f"{account['username']} {'disabled' if disabled else 'enabled'}.")


@bp.post("/users/<user_id>/role")
def set_role(user_id: str):
    form = _form()
    if user_id == current_account()["id"]:
        raise AppError("own_account", "you cannot change your own role here")
    account = get_accounts().set_role(user_id, form.get("role", ""))
    _log("role_set", account["username"], role=account["role"])
    return _done(f"{account['username']} is now {account['role']}.")


@bp.post("/users/<user_id>/password")
def reset_password(user_id: str):
    form = _form()
    accounts = get_accounts()
    account = accounts.get(user_id)
    accounts.set_password(account["username"], form.get("password"))
    _log("password_reset", account["username"])  # never the password itself
    return _done(f"New password set for {account['username']}; their browsers are signed out.")


@bp.post("/users/<user_id>/delete")
def delete_user(user_id: str):
    form = _form()
    accounts = get_accounts()
    account = accounts.get(user_id)
    if user_id == current_account()["id"]:
        raise AppError("own_account", "you cannot delete your own account here")
    if (form.get("confirm") or "").strip().lower() != account["username"]:
        raise AppError("not_confirmed", "type the username to confirm deleting it and its data")
    accounts.delete(user_id)
    _log("user_deleted", account["username"])
    return _done(f"Deleted {account['username']} and their data.")


# A cell starting with one of these is a formula to a spreadsheet (tab and CR too: some strip
# them and read what follows as the formula).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """A CSV cell a spreadsheet shows as text, never runs as a formula (OWASP's advice)."""
    return "'" + value if value[:1] in _FORMULA_START else value


@bp.get("/usage.csv")
def usage_csv():
    """Every owner's usage per day, engine and model, for a spreadsheet."""
    accounts = get_accounts()
    names = {u["owner_id"]: u["username"] for u in accounts.list()}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["day", "user", "engine", "model", "replies", "prompt_tokens",
                     "completion_tokens"])
    days = request.args.get("days", "")
    for row in accounts.usage(min(int(days), 3660) if days.isdigit() else USAGE_DAYS):
        user = names.get(row["owner_id"], "(anonymous)")
        writer.writerow([row["day"][:10], user, row["engine"], csv_text(row["model"]), row["replies"],
                         row["prompt_tokens"], row["completion_tokens"]])
    _log("usage_exported", None)
    response = Response(out.getvalue(), mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="bchat-usage-{utcnow().date()}.csv"'
    return response
