"""``lukewarm``: the command line for people (dev, deploy, call, image build-base)."""
from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import orjson

DEFAULT_URL = "http://127.0.0.1:8080"
HTTP_TIMEOUT_S = 120.0


def _http(method: str, url: str, token: str, body: Any = None, host: str | None = None) -> tuple[int, Any]:
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as resp:
            raw = resp.read()
            return resp.status, orjson.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return exc.code, {"error": raw.decode(errors="replace")[:200], "type": "http_error"}
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise SystemExit(f"cannot reach {url}: {exc}") from None


def _print_result(status: int, body: Any) -> int:
    sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0 if 200 <= status < 300 else 1


def cmd_dev(args: argparse.Namespace) -> int:
    from shared.dev import DevOptions, run

    return run(DevOptions(
        port=args.port, proxy_port=args.proxy_port, redis_url=args.redis_url, runtime=args.runtime,
        example=not args.no_example, host=args.host,
        admin_token=os.environ.get("LUKEWARM_ADMIN_TOKEN", ""),
        proxy_secret=os.environ.get("LUKEWARM_PROXY_SECRET", ""),
        tls=args.tls, tls_cert=args.tls_cert, tls_key=args.tls_key,
    ))


def cmd_deploy(args: argparse.Namespace) -> int:
    image = args.image
    if args.build:
        from runtime_proxy.docker_runtime import build_image

        image = image or f"lukewarm-{args.customer}/{args.model}:latest"
        build_image(args.build, image)
    if not image:
        raise SystemExit("give --image, or --build DIR to build one")
    body: dict[str, Any] = {"image": image}
    if args.entrypoint:
        body["entrypoint"] = args.entrypoint
    if args.batch_size:
        body["batch_size"] = args.batch_size
    branch = args.branch.replace("/", "~")
    url = f"{args.url}/api/v1/customers/{args.customer}/models/{args.model}/branches/{branch}/versions"
    return _print_result(*_http("POST", url, args.token, body))


def cmd_call(args: argparse.Namespace) -> int:
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        raise SystemExit(f"--data must be JSON: {exc}") from None
    path = f"/v1/{args.model}/{args.version}" if args.branch == "main" else \
        f"/v1/{args.model}/{args.branch.replace('/', '~')}/{args.version}"
    return _print_result(*_http("POST", args.url + path, args.key, {"data": data},
                                host=f"{args.customer}.{args.base_domain}"))


def cmd_build_base(args: argparse.Namespace) -> int:
    from shared.baseimage import main as build_base_main

    return build_base_main([])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lukewarm", description="Serve ML models: cold starts become lukewarm.")
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run an ingress and a proxy in the foreground, with the example model")
    dev.add_argument("--port", type=int, default=8080)
    dev.add_argument("--proxy-port", type=int, default=8081)
    dev.add_argument("--redis-url", default=os.environ.get("LUKEWARM_REDIS_URL", "redis://127.0.0.1:6379/0"))
    dev.add_argument("--runtime", choices=["docker", "process", "auto"], default=os.environ.get("LUKEWARM_RUNTIME", "auto"))
    dev.add_argument("--no-example", action="store_true")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--tls", action="store_true",
                     help="serve the ingress over HTTPS only, with a local CA and a *.localhost certificate")
    dev.add_argument("--tls-cert", default=os.environ.get("LUKEWARM_TLS_CERT", ""),
                     help="serve the ingress over HTTPS only with this certificate (PEM; with --tls-key)")
    dev.add_argument("--tls-key", default=os.environ.get("LUKEWARM_TLS_KEY", ""), help="its private key (PEM)")
    dev.set_defaults(fn=cmd_dev)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LUKEWARM_URL", DEFAULT_URL))
    common.add_argument("--customer", default=os.environ.get("LUKEWARM_CUSTOMER", "demo"))
    common.add_argument("--branch", default="main")

    deploy = sub.add_parser("deploy", parents=[common], help="deploy a new version of a model")
    deploy.add_argument("model")
    deploy.add_argument("--image", default="")
    deploy.add_argument("--build", default="", help="build the image from this directory first")
    deploy.add_argument("--entrypoint", default="")
    deploy.add_argument("--batch-size", type=int, default=0)
    deploy.add_argument("--token", default=os.environ.get("LUKEWARM_ADMIN_TOKEN") or os.environ.get("LUKEWARM_API_KEY", ""))
    deploy.set_defaults(fn=cmd_deploy)

    call = sub.add_parser("call", parents=[common], help="call a model")
    call.add_argument("model")
    call.add_argument("version", nargs="?", default="latest")
    call.add_argument("--data", required=True, help="the input, as JSON")
    call.add_argument("--key", default=os.environ.get("LUKEWARM_API_KEY", ""))
    call.add_argument("--base-domain", default=os.environ.get("LUKEWARM_BASE_DOMAIN", "localhost"))
    call.set_defaults(fn=cmd_call)

    image = sub.add_parser("image", help="images")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build_base = image_sub.add_parser("build-base", help="build lukewarm/python:bookworm offline (idempotent)")
    build_base.set_defaults(fn=cmd_build_base)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
