"""Who is calling: an API key (stored hashed) or the admin token."""
from __future__ import annotations

import hmac
import time

from aiohttp import web

from ingress.registry import KeyRecord
from ingress.view import StateView
from shared.errors import Forbidden, Unauthorized
from shared.http import bearer


def is_admin(request: web.Request, admin_token: str) -> bool:
    token = bearer(request)
    # A header aiohttp could not decode holds surrogates: compared as the bytes that came.
    return bool(admin_token) and bool(token) and \
        hmac.compare_digest(token.encode("utf-8", "surrogateescape"), admin_token.encode())


async def key_record(request: web.Request, view: StateView) -> KeyRecord:
    """The caller's key record; 401 when missing or unknown."""
    key = bearer(request)
    if not key:
        raise Unauthorized("missing API key: send it in the Authorization header")
    record = await view.api_key(key)
    if record is None:
        raise Unauthorized("unknown API key")
    if record.expired(time.time()):
        raise Unauthorized("this API key has expired")
    return record


async def require_customer_scope(request: web.Request, view: StateView, customer: str, scope: str) -> KeyRecord:
    record = await key_record(request, view)
    if record.customer != customer:
        raise Forbidden(f"this key does not belong to customer {customer!r}")
    if scope not in record.scopes:
        raise Forbidden(f"this key lacks the {scope!r} scope")
    return record
