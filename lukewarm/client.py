"""A small Python client: ``lukewarm.Client(url, key, customer=...)`` with ``predict`` and ``deploy``.

Blocking and stdlib-only (urllib), so a notebook or a batch job needs nothing else::

    from lukewarm import Client
    client = Client("https://lukewarm.example.com", key="lw_…", customer="acme")
    client.predict("churn", {"tenure": 7})            # → the model's answer
    client.deploy("churn", image="registry.example.com/lukewarm-acme/churn@sha256:…", memory_mb=2048)

Errors are ``LukewarmError`` with the contract's ``status``, ``type`` and message (and ``retry_after_s``
on 429/503); an unreachable ingress is a ``LukewarmError`` of status 0, type ``unreachable``.
"""
from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

DEFAULT_TIMEOUT_S = 120.0
# An answer larger than this is refused here too (the ingress caps what a model may answer).
MAX_ANSWER_BYTES = 256 * 2**20


class LukewarmError(Exception):
    """A call the ingress refused (or could not be reached for)."""

    def __init__(self, status: int, type_: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {type_}: {message}" if status else f"{type_}: {message}")
        self.status = status
        self.type = type_
        self.message = message
        self.retry_after_s = retry_after_s


class Client:
    """One ingress URL and one key. ``customer`` names the customer for inference when the URL is the
    fleet's base domain (the ingress routes ``/v1/…`` by the ``<customer>.<base domain>`` host)."""

    def __init__(self, url: str, key: str, customer: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must look like https://lukewarm.example.com, got {url!r}")
        self.url = url.rstrip("/")
        self.key = key
        self.customer = customer
        self.timeout_s = timeout_s
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self._inference_host = f"{customer}.{netloc}" if customer else None

    def predict(self, model: str, data: Any, version: str | int = "latest", branch: str = "main",
                timeout_s: int | None = None) -> Any:
        """The model's answer for ``data`` (one input, or a batch ``[[id, input], …]``)."""
        path = f"/v1/{_segment(model)}/{_segment(str(version))}" if branch == "main" else \
            f"/v1/{_segment(model)}/{_segment(branch.replace('/', '~'))}/{_segment(str(version))}"
        body: dict[str, Any] = {"data": data}
        if timeout_s is not None:
            body["timeout_seconds"] = timeout_s
        return self._call("POST", path, body, host=self._inference_host)["data"]

    def deploy(self, model: str, image: str, branch: str = "main", customer: str | None = None,
               **settings: Any) -> dict[str, Any]:
        """Deploy ``image`` as the next version of ``model`` (a deploy key or the admin token);
        ``settings`` are the version's (entrypoint, memory_mb, gpu, env, capacity, …). The answer's
        ``version`` is its number."""
        owner = customer or self.customer
        if not owner:
            raise ValueError("deploy needs the customer: Client(..., customer=...) or deploy(..., customer=...)")
        path = (f"/api/v1/customers/{_segment(owner)}/models/{_segment(model)}/branches/"
                f"{_segment(branch.replace('/', '~'))}/versions")
        return dict(self._call("POST", path, {"image": image, **settings}))

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Any call of the management API (``/api/v1/…``) with this client's credentials: its JSON answer."""
        return self._call(method, path, body)

    def _call(self, method: str, path: str, body: Any, host: str | None = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Bearer {self.key}")
        if host:
            request.add_header("Host", host)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                raw = _read(resp)
                return orjson.loads(raw) if raw else None  # 204: nothing to say
        except urllib.error.HTTPError as exc:
            raise _error(exc.code, _read(exc), exc.headers.get("Retry-After")) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise LukewarmError(0, "unreachable", f"cannot reach {self.url}: {exc}") from None
        except orjson.JSONDecodeError:
            raise LukewarmError(0, "bad_answer", f"{self.url}{path} did not answer JSON") from None


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="~")


def _read(resp: Any) -> bytes:
    data = resp.read(MAX_ANSWER_BYTES + 1)
    if len(data) > MAX_ANSWER_BYTES:
        raise LukewarmError(0, "too_large", f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
    return bytes(data)


def _error(status: int, raw: bytes, retry_after: str | None) -> LukewarmError:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        kind, message = str(body.get("type") or "error"), body["error"]
    else:
        kind, message = "http_error", raw[:200].decode(errors="replace")
    try:
        wait = float(retry_after) if retry_after else None
    except ValueError:
        wait = None
    return LukewarmError(status, kind, message, wait)
