"""The management API: customers, keys, versions, aliases, logs, fleet status."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from aiohttp import web

from ingress import state, status_page
from ingress.auth import is_admin, key_record
from ingress.proxy_client import ProxyUnreachable
from ingress.usage import USAGE_PATH, usage_handler
from shared.errors import ApiError, Conflict, Forbidden, Refused, Unauthorized, bad_request, not_found, unavailable
from shared.http import json_response, read_json
from shared.images import check_customer_image, parse_image, shared_repositories
from shared.metrics import CONTENT_TYPE
from shared.messages import (
    PATCHABLE_FIELDS, DeployLimits, VersionSpec, check_alias, check_branch, check_name, validate_deploy,
    validate_settings,
)

BRANCH_PATH = "/api/v1/customers/{customer}/models/{model}/branches/{branch}"
SCOPES = {"predict", "deploy"}
RESOLVE_TIMEOUT_S = 300.0
RESOLVE_TRIES = 3
MAX_KEY_LIFETIME_S = 10 * 365 * 86400


def _admin(request: web.Request) -> None:
    if not is_admin(request, request.app[state.SETTINGS].admin_token):
        raise Unauthorized("this call needs the admin token")


async def _deployer(request: web.Request, customer: str) -> bool:
    """The admin (True), or a key of this customer with the deploy scope (False)."""
    if is_admin(request, request.app[state.SETTINGS].admin_token):
        return True
    record = await key_record(request, request.app[state.VIEW])
    if record.customer != customer:
        raise Forbidden(f"this key does not belong to customer {customer!r}")
    if "deploy" not in record.scopes:
        raise Forbidden("this key lacks the 'deploy' scope")
    return False


async def _customer(request: web.Request) -> tuple[str, bool]:
    """The customer named in the path, and whether the caller is the admin."""
    customer = check_name("customer", request.match_info["customer"])
    admin = await _deployer(request, customer)
    if not await request.app[state.REGISTRY].customer_exists(customer):
        raise not_found(f"no customer {customer!r}")
    return customer, admin


async def _branch(request: web.Request) -> tuple[str, str, str]:
    customer, _ = await _customer(request)
    model = check_name("model", request.match_info["model"])
    return customer, model, check_branch(request.match_info["branch"].replace("~", "/"))


def _version_number(request: web.Request) -> int:
    raw = request.match_info["number"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12 or int(raw) < 1:
        raise bad_request(f"version must be a positive integer, got {raw!r}")
    return int(raw)


def _version_body(spec: VersionSpec) -> dict[str, Any]:
    return spec.to_dict()


# ---- customers and keys ------------------------------------------------------------

async def put_customer(request: web.Request) -> web.Response:
    _admin(request)
    name = check_name("customer", request.match_info["customer"])
    created = await request.app[state.REGISTRY].put_customer(name)
    return json_response({"customer": name, "created": created}, status=201 if created else 200)


async def create_key(request: web.Request) -> web.Response:
    customer, admin = await _customer(request)
    body: Any = {}
    if request.can_read_body:
        body = await read_json(request)
    if not isinstance(body, dict) or set(body) - {"scopes", "expires_in_s"}:
        raise bad_request('body must be {} or {"scopes": ["predict", "deploy"], "expires_in_s": 86400}')
    scopes = body.get("scopes", ["predict"])
    if not isinstance(scopes, list) or not scopes or not all(isinstance(x, str) for x in scopes) \
            or not set(scopes) <= SCOPES:
        raise bad_request(f"scopes must be a non-empty list of {sorted(SCOPES)}")
    if "deploy" in scopes and not admin:
        # A leaked deploy key must not be able to mint itself successors that outlive its revocation.
        raise Forbidden("only the admin may create keys with the 'deploy' scope")
    expires_in_s = body.get("expires_in_s")
    if expires_in_s is not None and (isinstance(expires_in_s, bool) or not isinstance(expires_in_s, int)
                                     or not 1 <= expires_in_s <= MAX_KEY_LIFETIME_S):
        raise bad_request(f"expires_in_s must be an integer from 1 to {MAX_KEY_LIFETIME_S}")
    record, key = await request.app[state.REGISTRY].create_key(customer, tuple(sorted(set(scopes))), expires_in_s)
    return json_response({"id": record.id, "key": key, "scopes": list(record.scopes),
                          "expires_at": record.expires_at}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    customer, _ = await _customer(request)
    return json_response({"keys": await request.app[state.REGISTRY].list_keys(customer)})


async def delete_key(request: web.Request) -> web.Response:
    customer, _ = await _customer(request)
    if len(request.match_info["key_id"]) > 64:
        raise not_found("no such key")
    await request.app[state.REGISTRY].delete_key(customer, request.match_info["key_id"])
    return web.Response(status=204)


# ---- versions and aliases ----------------------------------------------------------

def _deploy_limits(request: web.Request) -> DeployLimits:
    settings = request.app[state.SETTINGS]
    return DeployLimits(max_memory_mb=settings.max_memory_mb, max_cpus=settings.max_cpus)


def _check_image(request: web.Request, image: str, customer: str, admin: bool) -> None:
    """A customer's key deploys only its own namespace; the admin anything (a path too, for dev's processes)."""
    settings = request.app[state.SETTINGS]
    if not admin:
        check_customer_image(image, customer, settings.image_prefix, shared_repositories(settings.shared_images))
    elif not image.startswith(("dir:", "/")):
        parse_image(image)


async def _pin_image(request: web.Request, image: str) -> str:
    """The content id ``image`` names now, as a proxy's engine resolves it: the version runs that forever,
    whatever the tag names later. 422 when no host has it and none can pull it."""
    proxies = sorted(request.app[state.VIEW].live_proxies(), key=lambda p: image not in p.images)
    if not proxies:
        raise unavailable("no runtime proxy is alive to check the image", 2)
    client = request.app[state.DISPATCHER].client
    for proxy in proxies[:RESOLVE_TRIES]:
        try:
            return await client.resolve_image(proxy.url, image, RESOLVE_TIMEOUT_S)
        except ProxyUnreachable:
            continue
        except ApiError as exc:
            if exc.type != "image_unavailable":
                raise
    raise Refused(f"image {image} is on no host and none could pull it", "image_unavailable")


async def create_version(request: web.Request) -> web.Response:
    customer, admin = await _customer(request)
    model = check_name("model", request.match_info["model"])
    branch = check_branch(request.match_info["branch"].replace("~", "/"))
    fields = validate_deploy(await read_json(request), _deploy_limits(request))
    _check_image(request, fields["image"], customer, admin)
    fields["image_id"] = await _pin_image(request, fields["image"])
    registry = request.app[state.REGISTRY]
    capacity = fields.get("capacity")
    warm_count = capacity.min if capacity is not None else 0
    spec = await registry.create_version(customer, model, branch, fields, move_latest=warm_count == 0)
    if warm_count:
        await _prewarm_or_withdraw(request, spec, warm_count)
        await registry.advance_latest(customer, model, branch, spec.version)
    request.app[state.VIEW].note_pointers(customer, model, branch,
                                          await registry.get_pointers(customer, model, branch))
    return json_response(_version_body(spec), status=201)


async def _prewarm_or_withdraw(request: web.Request, spec: VersionSpec, count: int) -> None:
    """``capacity.min`` ready replicas before ``latest`` moves; a version that never gets ready is withdrawn,
    ``latest`` stays, and the version (when its number cannot be given back) records why."""
    deadline = time.time() + request.app[state.SETTINGS].rollout_timeout_s
    try:
        await request.app[state.DISPATCHER].prewarm(spec, count, deadline)
    except ApiError as exc:
        why = f"version never got ready ({exc.type}): {exc.message}"
        await request.app[state.REGISTRY].withdraw_version(spec, why)
        raise Refused(why, "prewarm_failed") from None


MAX_LISTED_VERSIONS = 1000


async def list_versions(request: web.Request) -> web.Response:
    """The branch's live versions (newest last, at most the last 1000) and its pointers (latest, aliases)."""
    customer, model, branch = await _branch(request)
    registry = request.app[state.REGISTRY]
    numbers = await registry.live_versions(customer, model, branch)
    return json_response({"versions": numbers[-MAX_LISTED_VERSIONS:], "truncated": len(numbers) > MAX_LISTED_VERSIONS,
                          "pointers": await registry.get_pointers(customer, model, branch)})


async def get_version(request: web.Request) -> web.Response:
    customer, model, branch = await _branch(request)
    spec = await request.app[state.REGISTRY].require_version(customer, model, branch, _version_number(request))
    return json_response(_version_body(spec))


async def patch_version(request: web.Request) -> web.Response:
    customer, model, branch = await _branch(request)
    registry = request.app[state.REGISTRY]
    spec = await registry.require_version(customer, model, branch, _version_number(request))
    changes = validate_settings(await read_json(request), PATCHABLE_FIELDS, _deploy_limits(request))
    spec = dataclasses.replace(spec, **changes)
    await registry.save_version(spec)
    request.app[state.VIEW].forget_version(spec.key)
    return json_response(_version_body(spec))


async def retire_version(request: web.Request) -> web.Response:
    customer, model, branch = await _branch(request)
    registry = request.app[state.REGISTRY]
    spec = await registry.require_version(customer, model, branch, _version_number(request))
    pointers = await registry.get_pointers(customer, model, branch)
    held = sorted(name for name, number in pointers.items() if number == spec.version and name != "latest")
    if held:
        raise Conflict(f"version {spec.version} is named by alias(es) {', '.join(held)}: move them first")
    await registry.save_version(dataclasses.replace(spec, retired=True))
    request.app[state.VIEW].forget_version(spec.key)
    return web.Response(status=204)


async def rollback(request: web.Request) -> web.Response:
    """``latest`` back to the given version, or to the newest live one below it: one call."""
    customer, model, branch = await _branch(request)
    registry = request.app[state.REGISTRY]
    body: Any = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict) or set(body) - {"version"}:
        raise bad_request('body must be {} or {"version": <positive integer>}')
    current = (await registry.get_pointers(customer, model, branch)).get("latest")
    if current is None:
        raise not_found(f"no model {model!r} with branch {branch!r}")
    number = body.get("version")
    if number is None:
        older = [n for n in await registry.live_versions(customer, model, branch) if n < current]
        if not older:
            raise Conflict(f"no live version before {current} to roll back to")
        number = older[-1]
    elif isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise bad_request('body must be {} or {"version": <positive integer>}')
    await registry.require_version(customer, model, branch, number)
    await registry.set_pointer(customer, model, branch, "latest", number)
    request.app[state.VIEW].note_pointers(customer, model, branch,
                                          await registry.get_pointers(customer, model, branch))
    return json_response({"latest": number, "previous": current})


async def put_alias(request: web.Request) -> web.Response:
    customer, model, branch = await _branch(request)
    alias = check_alias(request.match_info["alias"])
    body = await read_json(request)
    number = body.get("version") if isinstance(body, dict) else None
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise bad_request('body must be {"version": <positive integer>}')
    registry = request.app[state.REGISTRY]
    await registry.require_version(customer, model, branch, number)
    await registry.set_pointer(customer, model, branch, alias, number)
    request.app[state.VIEW].note_pointers(customer, model, branch,
                                          await registry.get_pointers(customer, model, branch))
    return json_response({"alias": alias, "version": number})


async def delete_alias(request: web.Request) -> web.Response:
    customer, model, branch = await _branch(request)
    alias = check_alias(request.match_info["alias"])
    registry = request.app[state.REGISTRY]
    if not await registry.delete_pointer(customer, model, branch, alias):
        raise not_found(f"no alias {alias!r} on model {model!r} branch {branch!r}")
    request.app[state.VIEW].note_pointers(customer, model, branch,
                                          await registry.get_pointers(customer, model, branch))
    return web.Response(status=204)


async def read_logs(request: web.Request) -> web.Response:
    customer, model, branch = await _branch(request)
    raw = request.query.get("limit", "50")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 4 or not 1 <= int(raw) <= 1000:
        raise bad_request("limit must be an integer from 1 to 1000")
    await request.app[state.REQUEST_LOG].flush()
    logs, truncated = await request.app[state.REGISTRY].read_logs(customer, model, branch, int(raw))
    return json_response({"logs": logs, "truncated": truncated})


# ---- fleet status and health ---------------------------------------------------------

async def fleet_status(request: web.Request) -> web.Response:
    _admin(request)
    proxies = await request.app[state.REGISTRY].list_proxies()
    return json_response({"proxies": proxies, "ts": time.time()})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    view = request.app[state.VIEW]
    settings = request.app[state.SETTINGS]
    stale_s = view.stale_s()
    body = {"redis": view.redis_ok, "stale_s": None if stale_s == float("inf") else round(stale_s, 3),
            "proxies": len(view.live_proxies())}
    if not view.redis_ok or stale_s > settings.max_staleness_s:
        return json_response({**body, "ready": False, "error": "registry unreachable or state stale",
                              "type": "degraded"}, status=503)
    return json_response({**body, "ready": True})


async def metrics(request: web.Request) -> web.Response:
    view, dispatcher = request.app[state.VIEW], request.app[state.DISPATCHER]
    body = request.app[state.METRICS].render(dispatcher.pending_all(), len(view.live_proxies()), view.redis_ok,
                                             dispatcher.hedges)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_put("/api/v1/customers/{customer}", put_customer)
    r.add_post("/api/v1/customers/{customer}/keys", create_key)
    r.add_get("/api/v1/customers/{customer}/keys", list_keys)
    r.add_delete("/api/v1/customers/{customer}/keys/{key_id}", delete_key)
    r.add_post(BRANCH_PATH + "/versions", create_version)
    r.add_get(BRANCH_PATH + "/versions", list_versions)
    r.add_get(BRANCH_PATH + "/versions/{number}", get_version)
    r.add_patch(BRANCH_PATH + "/versions/{number}", patch_version)
    r.add_delete(BRANCH_PATH + "/versions/{number}", retire_version)
    r.add_post(BRANCH_PATH + "/rollback", rollback)
    r.add_put(BRANCH_PATH + "/aliases/{alias}", put_alias)
    r.add_delete(BRANCH_PATH + "/aliases/{alias}", delete_alias)
    r.add_get(BRANCH_PATH + "/logs", read_logs)
    r.add_get(USAGE_PATH, usage_handler(_customer))
    r.add_get("/api/v1/status", fleet_status)
    status_page.add_routes(app)  # /status: the page for staff, its sign-in and refreshes
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
