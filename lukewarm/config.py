"""The CLI's config file: where a person logs in once (``lukewarm login``).

``$LUKEWARM_CONFIG`` or ``~/.config/lukewarm/config.json``, mode 0600, holding ``url``, ``token`` (the
admin token or a deploy key), ``key`` (a predict key) and ``customer``. A setting is taken from the
flag, else the environment (``LUKEWARM_URL``, ``LUKEWARM_TOKEN``, ``LUKEWARM_API_KEY``,
``LUKEWARM_CUSTOMER``), else this file, else the default.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

FIELDS = ("url", "token", "key", "customer")
MAX_BYTES = 64 * 1024


def path() -> Path:
    given = os.environ.get("LUKEWARM_CONFIG")
    return Path(given) if given else Path.home() / ".config" / "lukewarm" / "config.json"


def load() -> dict[str, str]:
    """The saved settings ({} when there is no file); SystemExit (one line) when it is unreadable."""
    file = path()
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SystemExit(f"cannot read {file}: {exc.strerror or exc}") from None
    try:
        data: Any = orjson.loads(raw) if len(raw) <= MAX_BYTES else None
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise SystemExit(f"{file} is not a lukewarm config (a JSON object); `lukewarm login` writes one")
    return {k: str(v) for k, v in data.items() if k in FIELDS and isinstance(v, str)}


def save(values: dict[str, str]) -> Path:
    """Write ``values`` (merged over what is saved) with mode 0600, atomically; the file's path."""
    file = path()
    merged = {**load(), **{k: v for k, v in values.items() if k in FIELDS and v}}
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = file.with_name(file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(merged, option=orjson.OPT_INDENT_2))
    os.chmod(tmp, 0o600)  # an existing tmp kept its old mode
    tmp.replace(file)
    return file


def setting(name: str, flag: str | None, env: tuple[str, ...], default: str = "") -> str:
    """Flag, else the first environment variable set, else the config file, else ``default``."""
    if flag:
        return flag
    for var in env:
        if os.environ.get(var):
            return os.environ[var]
    return load().get(name) or default
