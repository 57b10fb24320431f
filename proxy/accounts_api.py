"""Accounting endpoints: `GET /v1/usage` (own usage; admins: anyone's, CSV export) and key
administration for admins (`POST/GET /v1/keys`, `DELETE /v1/keys/{key_id}`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from proxy.api import parse_body
from proxy.auth import Principal, new_key, require_admin
from proxy.errors import InvalidRequest, NotFound, PermissionDenied
from proxy.ledger import ApiKeyRecord
from proxy.protocol import KeyCreate
from proxy.state import BUDGETS, KEYS, LEDGER, PRINCIPAL, SETTINGS
from proxy.usage import as_csv, as_json, check_range, parse_time, report_row, total_row, usage_meta

GROUPS = ("model", "task", "day", "user")


def _principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def key_json(k: ApiKeyRecord) -> dict[str, Any]:
    """A key as shown to admins: never the hash, never the secret."""
    return {
        "id": k.key_id,
        "object": "api_key",
        "user": k.user,
        "admin": k.admin,
        "created": k.created.isoformat(),
        "revoked": k.revoked.isoformat() if k.revoked else None,
        "budget_kwh": k.budget_kwh,
        "budget_co2_grams": k.budget_co2_grams,
        "budget_period": k.budget_period,
    }


async def usage(request: web.Request) -> web.Response:
    principal = _principal(request)
    q = request.query
    start: datetime | None = None
    end: datetime | None = None
    param = "start"
    try:
        start = parse_time(q.get("start"), "start")
        param = "end"
        end = parse_time(q.get("end"), "end")
        check_range(start, end, ("start", "end"))
    except ValueError as e:
        raise InvalidRequest(str(e), param=param, code="invalid_value") from e
    group_by = q.get("group_by") or None
    if group_by is not None and group_by not in GROUPS:
        raise InvalidRequest(
            f"group_by must be one of {', '.join(GROUPS)}", param="group_by", code="invalid_value"
        )
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest("format must be json or csv", param="format", code="invalid_value")
    if principal.admin:
        user = q.get("user") or None
    else:
        if q.get("user") not in (None, "", principal.user):
            raise_forbidden()
        if group_by == "user":
            raise_forbidden()
        user = principal.user
    settings = request.app[SETTINGS]
    rows = await request.app[LEDGER].usage(user=user, start=start, end=end, group_by=group_by)  # type: ignore[arg-type]
    report = [report_row(r, settings.phone_charge_kwh) for r in rows]
    total = report_row(total_row(rows), settings.phone_charge_kwh)
    if fmt == "csv":
        return web.Response(
            text=as_csv(report),
            content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="wattproxy-usage.csv"'},
        )
    meta = usage_meta(user, start, end, group_by, settings.phone_charge_kwh)
    budgets = request.app[BUDGETS].budgets(user) if user else []
    if budgets:
        listed = [
            {
                "kwh": b.kwh,
                "co2_grams": b.co2_grams,
                "period": b.period,
                "remaining_kwh": b.remaining_kwh,
                "resets": b.reset.isoformat() if b.reset else None,
            }
            for b in budgets
        ]
        # `budget`: the one with the least kWh left (the first where none sets kWh); `budgets`: all,
        # one a period, shortest period first
        left = [
            (item["remaining_kwh"], i) for i, item in enumerate(listed) if item["remaining_kwh"] is not None
        ]
        meta["budget"] = listed[min(left)[1] if left else 0]
        meta["budgets"] = listed
    return web.Response(text=as_json(report, total, meta), content_type="application/json")


def raise_forbidden() -> None:
    raise PermissionDenied("a user key can only read its own usage", code="forbidden")


def _require_key_admin(request: web.Request) -> None:
    """An admin who came with a key: with auth off (`--auth none`) everyone is an admin, and keys
    minted or revoked then would hold once the server runs with keys on the same ledger."""
    principal = _principal(request)
    require_admin(principal)
    if principal.key_id is None:
        raise PermissionDenied(
            "keys are created and revoked only with auth on (--auth keys), or with 'wattproxy keys'",
            code="auth_off",
        )


async def create_key(request: web.Request) -> web.Response:
    _require_key_admin(request)
    body = KeyCreate.model_validate(parse_body(await request.read()))
    secret, record = new_key(
        body.user,
        admin=body.admin,
        budget_kwh=body.budget_kwh,
        budget_co2_grams=body.budget_co2_grams,
        budget_period=body.period,
    )
    ledger = request.app[LEDGER]
    await ledger.add_key(record)
    request.app[KEYS].forget()
    budgets = request.app[BUDGETS]
    budgets.set_keys(await ledger.keys(include_revoked=False))
    await budgets.refresh(ledger)
    return web.json_response({**key_json(record), "key": secret}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    require_admin(_principal(request))
    keys = await request.app[LEDGER].keys()
    return web.json_response({"object": "list", "data": [key_json(k) for k in keys]})


async def revoke_key(request: web.Request) -> web.Response:
    _require_key_admin(request)
    key_id = request.match_info["key_id"]
    ledger = request.app[LEDGER]
    if not await ledger.revoke_key(key_id):
        raise NotFound(f"no active key {key_id!r}", param="key_id", code="key_not_found")
    request.app[KEYS].forget()
    budgets = request.app[BUDGETS]
    budgets.set_keys(await ledger.keys(include_revoked=False))
    await budgets.refresh(ledger)  # a budget the revocation leaves new starts from what was spent
    return web.json_response({"id": key_id, "object": "api_key", "revoked": True})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/usage", usage)
    app.router.add_post("/v1/keys", create_key)
    app.router.add_get("/v1/keys", list_keys)
    app.router.add_delete("/v1/keys/{key_id}", revoke_key)
