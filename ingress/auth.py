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
    return await record_of(bearer(request), view)


async def record_of(key: str, view: StateView) -> KeyRecord:
    """The record of the API key ``key`` (a bearer token); 401 when missing, unknown or expired."""
    if not key:
        raise Unauthorized("missing API key: send it in the Authorization header")
    record = await view.api_key(key)
    if record is None:
        raise Unauthorized("unknown API key")
    if record.expired(time.time()):
        raise Unauthorized("this API key has expired")
    return record


async def require_scope(key: str, view: StateView, customer: str, scope: str) -> KeyRecord:
    """The record of ``key`` when it is ``customer``'s and has ``scope``; 401 or 403 otherwise."""
    record = await record_of(key, view)
    if record.customer != customer:
        raise Forbidden(f"this key does not belong to customer {customer!r}")
    if scope not in record.scopes:
        raise Forbidden(f"this key lacks the {scope!r} scope")
    return record
