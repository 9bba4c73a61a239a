"""``lukewarm``: the command line for people. ``lukewarm --help`` lists the commands, each has ``--help``."""
from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import orjson

from lukewarm import config
from lukewarm.manage import DEFAULT_URL, add_parsers, branch_path, customer_of, token_of, url_of

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
    from lukewarm.dev import DevOptions, run

    return run(DevOptions(
        port=args.port, proxy_port=args.proxy_port, redis_url=args.redis_url, runtime=args.runtime,
        example=not args.no_example, host=args.host,
        admin_token=os.environ.get("LUKEWARM_ADMIN_TOKEN", ""),
        proxy_secret=os.environ.get("LUKEWARM_PROXY_SECRET", ""),
        tls=args.tls, tls_cert=args.tls_cert, tls_key=args.tls_key,
    ))


def push_target(registry: str, customer: str, model: str, image: str, unique_tag: str) -> tuple[str, str]:
    """Where ``deploy --build`` pushes, as ``(<registry>/<repository>, <tag>)``: ``--image``'s repository and
    tag when given (its registry host, if any, must be ``registry``), else ``lukewarm-<customer>/<model>``
    and ``unique_tag``. SystemExit (one line) on a registry or an image that cannot be pushed to."""
    from shared.errors import ApiError
    from shared.images import parse_image

    registry = registry.strip().rstrip("/")
    try:
        host = parse_image(f"{registry}/x").domain if "://" not in registry else None
    except ApiError:
        host = None
    if host is None or host != registry:
        raise SystemExit(f"--registry / LUKEWARM_REGISTRY must be a registry host such as registry.example.com "
                         f"or 127.0.0.1:5000 (no scheme, no path), not {registry[:100]!r}")
    if not image:
        return f"{registry}/lukewarm-{customer}/{model}", unique_tag
    try:
        ref = parse_image(image)
    except ApiError as exc:
        raise SystemExit(f"--image: {exc}") from None
    if ref.digest:
        raise SystemExit("--image with --build names the repository and tag to push, not a digest")
    if ref.domain not in (None, registry):
        raise SystemExit(f"--image names registry {ref.domain}, but the registry to push to is {registry}")
    return f"{registry}/{ref.repository}", ref.tag or unique_tag


def _build_and_push(args: argparse.Namespace) -> str:
    """``deploy --build``: the image to deploy. With a registry, the build is pushed there and the pushed
    digest (``<registry>/<repository>@sha256:…``) is what is deployed: every host can pull it, and a later
    push under the same tag changes nothing for this version. Without one, a local tag of the content
    (``lukewarm/build.py``: a directory without a Dockerfile gets one, its requirements installed offline)."""
    from lukewarm.build import BuildError, build_model
    from runtime_proxy.docker_runtime import push_image
    from runtime_proxy.runtime import RuntimeFailure

    say = sys.stderr.write
    try:
        if not args.registry:
            repository = args.image.rsplit(":", 1)[0] if args.image else f"lukewarm-{args.customer}/{args.model}"
            return build_model(args.build, repository, say)
        # Unique per build: a tag pushed once is never moved by another build.
        unique = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        repository, tag = push_target(args.registry, args.customer, args.model, args.image, unique)
        built = build_model(args.build, repository, say)
        say(f"pushing {repository}:{tag} …\n")
        pushed = push_image(built, repository, tag, auth_file=args.registry_auth_file)
    except (RuntimeFailure, BuildError) as exc:
        raise SystemExit(f"lukewarm deploy: {exc}") from None
    sys.stderr.write(f"pushed {repository}:{tag} as {pushed}\n")
    return pushed


def idle_timeout(text: str) -> float | str:
    """``--idle-timeout-s``: a number of seconds or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected seconds or "auto", not {text!r}') from None


def deploy_body(args: argparse.Namespace, image: str) -> dict[str, Any]:
    """The version's settings from the flags (only those given: the ingress has the defaults)."""
    body: dict[str, Any] = {"image": image}
    for name in ("entrypoint", "batch_size", "memory_mb", "cpus", "gpu_memory_mb", "idle_timeout_s", "timeout_s",
                 "max_concurrency"):
        if getattr(args, name):
            body[name] = getattr(args, name)
    for flag in ("gpu", "keep_warm", "at_most_once"):
        if getattr(args, flag):
            body[flag] = True
    if args.env:
        env = {}
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise SystemExit(f"--env takes NAME=VALUE, not {item!r}")
            env[name] = value
        body["env"] = env
    capacity = {k: getattr(args, k) for k in ("min", "desired", "max") if getattr(args, k) is not None}
    if capacity:
        body["capacity"] = capacity
    return body


def cmd_deploy(args: argparse.Namespace) -> int:
    args.url, args.token, args.customer = url_of(args), token_of(args), customer_of(args)
    progress = sys.stderr.write if args.wait or args.build else (lambda _text: 0)
    image = _build_and_push(args) if args.build else args.image
    if not image:
        raise SystemExit("give --image, or --build DIR to build one")
    body = deploy_body(args, image)
    floor = int(body.get("capacity", {}).get("min") or 0)
    progress(f"deploying {image} as the next version of {args.model}"
             + (f" (pre-warming {floor} replica{'s' if floor != 1 else ''} before latest moves) …\n" if floor else " …\n"))
    started = time.monotonic()
    status, answer = _http("POST", args.url.rstrip("/") + branch_path(args) + "/versions", args.token, body)
    if not 200 <= status < 300:
        raise SystemExit(f"lukewarm deploy: {_error_line(status, answer)}")
    progress(f"version {answer.get('version')} deployed in {time.monotonic() - started:.1f} s\n")
    return _print_result(status, answer)


def cmd_call(args: argparse.Namespace) -> int:
    args.url, args.customer = url_of(args), customer_of(args)
    args.key = config.setting("key", args.key, ("LUKEWARM_API_KEY",))
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        raise SystemExit(f"--data must be JSON: {exc}") from None
    path = f"/v1/{args.model}/{args.version}" if args.branch == "main" else \
        f"/v1/{args.model}/{args.branch.replace('/', '~')}/{args.version}"
    return _print_result(*_http("POST", args.url + path, args.key, {"data": data},
                                host=f"{args.customer}.{args.base_domain}"))


def _error_line(status: int, body: Any) -> str:
    """A refused call as one line: ``403 forbidden: this key does not belong to customer 'acme'``."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        text = f"{status} {body.get('type') or 'error'}: {body['error']}"
    else:
        text = f"{status}: unexpected answer"
    return " ".join(text.split())[:300]


USAGE_COLUMNS = ("requests", "errors", "replica_seconds", "paused_seconds")


def usage_table(answer: dict[str, Any], hourly: bool = False) -> str:
    """``GET …/usage`` as a text table: a row per version (per version and hour with ``hourly``), then totals."""
    head = ["MODEL", "BRANCH", "VERSION", *(["HOUR"] if hourly else []), "REQUESTS", "ERRORS", "RUNNING_S", "PAUSED_S"]

    def cells(values: dict[str, Any]) -> list[str]:
        return [str(int(values.get("requests", 0))), str(int(values.get("errors", 0))),
                f"{float(values.get('replica_seconds', 0)):.1f}", f"{float(values.get('paused_seconds', 0)):.1f}"]

    rows: list[list[str]] = []
    for v in answer.get("versions", []):
        name = [str(v.get("model")), str(v.get("branch")), str(v.get("version"))]
        if hourly:
            rows.extend(name + [str(h.get("hour"))] + cells(h) for h in v.get("hours", []))
        else:
            rows.append(name + cells(v))
    rows.append(["TOTAL", "", ""] + ([""] if hourly else []) + cells(answer.get("total", {})))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    numeric = len(head) - len(USAGE_COLUMNS)
    lines = [(f"usage of {answer.get('customer')} from {answer.get('since')} to {answer.get('until')} "
              f"(UTC, {int(answer.get('bucket_s', 3600)) // 60}-minute buckets)")]
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) if i < numeric else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip())
    if answer.get("truncated"):
        lines.append(f"(more: run again with --since {answer.get('next_since')})")
    return "\n".join(lines) + "\n"


def cmd_usage(args: argparse.Namespace) -> int:
    args.url, args.token, args.customer = url_of(args), token_of(args), customer_of(args)
    query = {name: value for name in ("since", "until") if (value := getattr(args, name))}
    url = f"{args.url.rstrip('/')}/api/v1/customers/{urllib.parse.quote(args.customer, safe='')}/usage"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    try:
        status, body = _http("GET", url, args.token)
    except ValueError as exc:  # urllib's "unknown url type" and http.client.InvalidURL
        raise SystemExit(f"bad --url {args.url!r}: {exc}") from None
    if not 200 <= status < 300 or not isinstance(body, dict):
        raise SystemExit(f"lukewarm usage: {_error_line(status, body)}")
    if args.json:
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(usage_table(body, hourly=args.hourly))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from lukewarm.build import init

    written = init(args.directory, args.name or os.path.basename(os.path.abspath(args.directory)))
    for path in written:
        sys.stdout.write(f"wrote {path}\n")
    sys.stdout.write("next: lukewarm deploy <model> --build " + args.directory + " --wait\n")
    return 0


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

    # Every setting: the flag, else LUKEWARM_URL / LUKEWARM_TOKEN / LUKEWARM_CUSTOMER, else `lukewarm login`'s file.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="", help=f"the ingress (default: the saved one, else {DEFAULT_URL})")
    common.add_argument("--token", default="", help="the admin token or a deploy key (default: the saved one)")
    common.add_argument("--customer", default="", help="the customer (default: the saved one, else demo)")
    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("model")
    model_args.add_argument("--branch", default="main")
    add_parsers(sub, common, model_args)

    deploy = sub.add_parser("deploy", parents=[common, model_args], help="deploy a new version of a model")
    deploy.add_argument("--image", default="")
    deploy.add_argument("--build", default="", help="build the image from this directory first")
    deploy.add_argument("--registry", default=os.environ.get("LUKEWARM_REGISTRY", ""),
                        help="with --build: push the image to this registry (host[:port]) and deploy its digest")
    deploy.add_argument("--registry-auth-file", default=os.environ.get("LUKEWARM_REGISTRY_AUTH_FILE", ""),
                        help="the registry login to push with, as a Docker config.json (default: docker's own)")
    deploy.add_argument("--entrypoint", default="", help="module:function (default main:predict)")
    deploy.add_argument("--batch-size", type=int, default=0, help="inputs per call of a batch model")
    deploy.add_argument("--memory-mb", type=int, default=0)
    deploy.add_argument("--cpus", type=float, default=0.0)
    deploy.add_argument("--gpu", action="store_true", help="one GPU per replica")
    deploy.add_argument("--gpu-memory-mb", type=int, default=0)
    deploy.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="repeat for more")
    deploy.add_argument("--min", type=int, default=None, help="capacity.min: replicas kept ready")
    deploy.add_argument("--desired", type=int, default=None, help="capacity.desired")
    deploy.add_argument("--max", type=int, default=None, help="capacity.max: replicas at most")
    deploy.add_argument("--idle-timeout-s", type=idle_timeout, default=0.0,
                        help='seconds, or "auto": learn when to pause, stop and pre-warm from the calls')
    deploy.add_argument("--keep-warm", action="store_true")
    deploy.add_argument("--timeout-s", type=float, default=0.0, help="a request's deadline")
    deploy.add_argument("--max-concurrency", type=int, default=0)
    deploy.add_argument("--at-most-once", action="store_true", help="never hedge or re-send a chunk that may have run")
    deploy.add_argument("--wait", action="store_true", help="say what happens: build, push, pre-warm")
    deploy.set_defaults(fn=cmd_deploy)

    call = sub.add_parser("call", parents=[common], help="call a model")
    call.add_argument("model")
    call.add_argument("version", nargs="?", default="latest")
    call.add_argument("--branch", default="main")
    call.add_argument("--data", required=True, help="the input, as JSON")
    call.add_argument("--key", default="", help="a predict key (default: LUKEWARM_API_KEY, else the saved one)")
    call.add_argument("--base-domain", default=os.environ.get("LUKEWARM_BASE_DOMAIN", "localhost"))
    call.set_defaults(fn=cmd_call)

    usage = sub.add_parser("usage", parents=[common],
                           help="requests, errors and replica-seconds per version, in hourly buckets")
    usage.add_argument("--since", default="", help="ISO 8601 or epoch seconds (default: 24 h before --until)")
    usage.add_argument("--until", default="", help="ISO 8601 or epoch seconds (default: now)")
    usage.add_argument("--hourly", action="store_true", help="a row per version and hour")
    usage.add_argument("--json", action="store_true", help="the answer as JSON")
    usage.set_defaults(fn=cmd_usage)

    init = sub.add_parser("init", help="scaffold a model directory (main.py, requirements.txt, README.md)")
    init.add_argument("directory")
    init.add_argument("--name", default="", help="the model's name (default: the directory's)")
    init.set_defaults(fn=cmd_init)

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
