"""Hypothesis strategies and a raw HTTP/1.1 client for ``test_fuzz.py``.

The client writes requests byte for byte (no client library normalises the
path, adds a Host header or re-encodes a header value), so a generated
request reaches the ingress exactly as generated. A ``Request``'s ``repr`` is
its minimal reproduction: Hypothesis prints it for a falsifying example.

Two families of requests:

* *well-formed HTTP*: a request target of visible ASCII, header values of
  visible ASCII, spaces and ``obs-text`` bytes (0x80-0xFF, which RFC 9110
  still allows in a field value), a Host header (or HTTP/1.0 without one).
  These reach the application: everything it answers is under the contract.
* *HTTP-layer garbage*: raw non-ASCII bytes in the path, control bytes in a
  header, HTTP/1.1 without Host, an over-long request line, … What the HTTP
  parser refuses before any handler runs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import string
import urllib.parse
from typing import Any, Protocol

import orjson
from hypothesis import strategies as st

# ---- the raw client -------------------------------------------------------------------

TRACEBACK_FRAGMENTS = (b"Traceback (most recent call last)", b'File "')
ERROR_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _short(raw: bytes, keep: int = 160) -> str:
    """``raw`` for a repro line: whole when short, else head and tail with the length."""
    if len(raw) <= keep:
        return repr(raw)
    return f"{raw[: keep // 2]!r} + …({len(raw) - keep} more bytes)… + {raw[-keep // 2:]!r}"


@dataclasses.dataclass(frozen=True)
class Request:
    """A well-formed HTTP/1.1 (or 1.0) request; ``wire()`` adds Content-Length and ``Connection: close``."""

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes | None = None
    version: bytes = b"HTTP/1.1"

    def wire(self) -> bytes:
        lines = [self.method + b" " + self.target + b" " + self.version]
        lines += [name + b": " + value for name, value in self.headers]
        if self.body is not None:
            lines.append(b"Content-Length: %d" % len(self.body))
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + (self.body or b"")

    def __repr__(self) -> str:
        headers = ", ".join(f"{n.decode('latin-1')}: {_short(v)}" for n, v in self.headers) or "(none)"
        body = "(none)" if self.body is None else _short(self.body)
        return (f"Request({self.method.decode('latin-1')} {_short(self.target)} {self.version.decode('latin-1')}"
                f" | headers: {headers} | body: {body})")


@dataclasses.dataclass(frozen=True)
class Response:
    """What came back, parsed leniently (whatever the server sends, the test wants to look at it)."""

    status: int
    headers: dict[str, str]  # lower-cased names, values as latin-1 text
    body: bytes
    raw_head: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        ctype = self.headers.get("content-type", "-")
        return f"Response({self.status}, content-type {ctype}, body {_short(self.body, 400)})"


class Hang(AssertionError):
    """The server gave no complete answer within the client's timeout."""


def _dechunk(data: bytes) -> bytes:
    out, rest = bytearray(), data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)


def parse_response(data: bytes) -> Response:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete HTTP answer, got {_short(data)}")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Response(status, headers, body, head)


async def send(port: int, request: Sendable, timeout_s: float) -> Response:
    """One request on a fresh connection (``Connection: close``), read to EOF; ``Hang`` past ``timeout_s``."""
    writer: asyncio.StreamWriter | None = None
    data = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**26)
            try:
                writer.write(request.wire())
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                pass  # the server may answer (413) and close before reading a body whole
            while True:
                try:
                    chunk = await reader.read(2**20)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        raise Hang(f"no complete answer within {timeout_s} s (got {_short(bytes(data))}) to {request!r}") from None
    finally:
        if writer is not None:
            writer.close()
    return parse_response(bytes(data))


class Sendable(Protocol):
    """A request: its bytes on the wire and its method (a HEAD answer has no body to check)."""

    @property
    def method(self) -> bytes: ...

    def wire(self) -> bytes: ...


# ---- building blocks ---------------------------------------------------------------------

def pct(text: str) -> str:
    """Percent-encode everything but RFC 3986's unreserved characters."""
    return urllib.parse.quote(text, safe="")


# Characters that encode to valid UTF-8 (no surrogates) and are no control characters.
PRINTABLE = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))
ANY_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
SHORT_TEXT = st.text(alphabet=PRINTABLE, max_size=30)

# Characters str.isdigit() calls digits: other scripts' (int() reads those) and superscripts, circled
# numbers and the like (int() refuses those). Either way no version number of ours.
SUPERSCRIPT_TWO = "\N{SUPERSCRIPT TWO}"
ARABIC_ONE = "\N{ARABIC-INDIC DIGIT ONE}"
FULLWIDTH_FIVE = "\N{FULLWIDTH DIGIT FIVE}"
UNICODE_DIGIT = st.sampled_from([
    SUPERSCRIPT_TWO, "\N{SUPERSCRIPT ONE}", "\N{SUPERSCRIPT ZERO}", "\N{SUBSCRIPT NINE}", "\N{CIRCLED DIGIT ONE}",
    "\N{DIGIT ONE COMMA}", "\N{ETHIOPIC DIGIT ONE}", ARABIC_ONE,
    "\N{EXTENDED ARABIC-INDIC DIGIT FOUR}", "\N{NKO DIGIT ZERO}", "\N{DEVANAGARI DIGIT FIVE}", "\N{THAI DIGIT THREE}",
    FULLWIDTH_FIVE, "\N{MATHEMATICAL DOUBLE-STRUCK DIGIT ZERO}", "\N{MATHEMATICAL MONOSPACE DIGIT NINE}",
])

# Visible ASCII allowed raw in a path segment (RFC 3986 pchar minus '%', which comes separately).
PCHAR = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
ODD_ESCAPES = st.sampled_from(["%", "%2", "%z", "%zz", "%00", "%2F", "%2f", "%2e%2e", "%C2%B2", "%FF", "%c3%28",
                               "%E2%80%A8", "%0A", "%0D%0A", "%25", "%7E", "%u00b2", "%%", "%C0%AF"])


def long_segment(max_bytes: int = 6000) -> st.SearchStrategy[str]:
    """One character (or escape) repeated: at most ``max_bytes`` on the wire (a request line has 8190)."""
    unit = st.sampled_from(["a", "9", "~", "-", "%41", pct(SUPERSCRIPT_TWO), pct("\N{LATIN SMALL LETTER E WITH ACUTE}"),
                            "%zz"])
    return unit.flatmap(lambda u: st.integers(64, max_bytes // len(u)).map(lambda n: u * n))


def segment(known: list[str]) -> st.SearchStrategy[str]:
    """One path segment: a known good value, or anything a client could put there."""
    return st.one_of(
        st.sampled_from(known),
        st.sampled_from(known),
        ANY_TEXT.map(pct),
        st.text(alphabet=PCHAR, min_size=1, max_size=30),
        st.lists(st.one_of(st.text(alphabet=PCHAR, min_size=1, max_size=4), ODD_ESCAPES), min_size=1,
                 max_size=5).map("".join),
        st.sampled_from(["", ".", "..", "%2e", "~", "~~", "a~~b", "~main", "main~", "latest", "LATEST", "0", "-1",
                         "+1", "01", "1.0", "1e3", "0x1", "%201", "1%20", "null", "true", "_", "-", "a" * 63,
                         "a" * 64, "%2Fetc%2Fpasswd", "..%2F..%2F", "%00", "%0A"]),
        long_segment(),
    )


def version_segment() -> st.SearchStrategy[str]:
    unicode_number = st.lists(st.one_of(UNICODE_DIGIT, st.sampled_from(string.digits)), min_size=1, max_size=4)
    return st.one_of(
        st.sampled_from(["latest", "1", "stable", "2", "999", pct(SUPERSCRIPT_TWO), pct(ARABIC_ONE),
                         pct(FULLWIDTH_FIVE)]),
        segment(["latest", "1", "stable"]),
        unicode_number.map("".join).map(pct),
        st.integers(min_value=-2**70, max_value=2**70).map(str),
        st.integers(4290, 6000).map(lambda n: "9" * n),  # past int()'s 4300-digit limit
        unicode_number.map("".join).map(pct),
    )


def branch_segment() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["main", "feat~x", "feat~x~y", "staging"]),
        segment(["main", "feat~x"]),
        st.lists(st.text(alphabet=string.ascii_letters + string.digits + "._-", max_size=6), min_size=1,
                 max_size=6).map("~".join),
    )


def limit_values() -> st.SearchStrategy[str]:
    """What a client may put after ``?limit=``."""
    return st.one_of(
        st.integers(-5, 1100).map(str),
        st.sampled_from(["0", "1", "1000", "1001", "01", "+5", "-0", "5.0", "1e2", "0x10", "%205", "5%20", "", "%C2%B2",
                         pct(ARABIC_ONE * 2), pct(FULLWIDTH_FIVE), "%00", "null", "true"]),
        st.lists(UNICODE_DIGIT, min_size=1, max_size=3).map(lambda ds: pct("".join(ds))),
        st.integers(4290, 5000).map(lambda n: "1" * n),
        segment(["5"]),
    )


def query(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(values.map(lambda v: "?limit=" + v), values.map(lambda v: "?limit=" + v),
                     st.lists(values, min_size=2, max_size=3).map(lambda vs: "?" + "&".join(f"limit={v}" for v in vs)),
                     st.sampled_from(["?", "?limit", "?limit=", "?=1", "?x=1", "?limit=1&x", "#frag", "?%zz=%zz"]))


# ---- header values ----------------------------------------------------------------------

# Bytes allowed in a field value (RFC 9110): VCHAR, SP, HTAB and obs-text.
_FIELD_BYTES = bytes(range(0x21, 0x7F)) + b" \t" + bytes(range(0x80, 0x100))
FIELD_BYTES = st.lists(st.sampled_from(_FIELD_BYTES), min_size=1, max_size=40).map(bytes)
UNICODE_FIELD = st.text(alphabet=PRINTABLE, min_size=1, max_size=30).map(lambda s: s.encode("utf-8"))


def field_value() -> st.SearchStrategy[bytes]:
    """A header value that is valid HTTP (non-empty: an empty value is a different, tested, case)."""
    return st.one_of(FIELD_BYTES, UNICODE_FIELD, st.text(alphabet=string.printable.strip(), min_size=1,
                                                          max_size=40).map(str.encode)).filter(
        lambda b: b.strip(b" \t") != b"")


def host_header(customer: str, others: list[str]) -> st.SearchStrategy[bytes | None]:
    """A Host value (None: no Host header at all)."""
    good = [f"{customer}.localhost", f"{customer}.localhost:8080", f"{customer.upper()}.LOCALHOST",
            f"{customer}.localhost.", f"www.{customer}.localhost", f"{customer}.localhost:0"]
    label = st.text(alphabet=string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=70)
    return st.one_of(
        st.sampled_from(good).map(str.encode),
        st.sampled_from(good).map(str.encode),
        st.none(),
        st.sampled_from([f"{o}.localhost" for o in others] + [
            "localhost", ".localhost", "..localhost", "localhost:8080", "[::1]", "[::1]:8080", "[::1]:",
            "[fe80::1%25eth0]:80", "::1", "::ffff:127.0.0.1", "127.0.0.1", "127.0.0.1:8080", f"{customer}.localhost:",
            f"{customer}.localhost:99999999999999999999", f"{customer}.localhost:-1", f"{customer}.localhost:abc",
            f"{customer}:8080.localhost", f"{customer}.localhost:8080:9090", f"[{customer}.localhost]",
            f"{customer}.example.com", f"{customer}.localhost.evil.com", f"evil.com/{customer}.localhost",
            f"user@{customer}.localhost", f"{customer}..localhost", f"{customer}.localhost..",
            f"xn--{customer}.localhost", "*.localhost", "%61cme.localhost", f"{customer}%2elocalhost",
            "a" * 300 + ".localhost", ".".join(["a"] * 120) + ".localhost",
        ]).map(str.encode),
        st.tuples(label, st.sampled_from(["", ":1", ":65535", ":", ":x"])).map(
            lambda t: f"{t[0]}.localhost{t[1]}".encode()),
        SHORT_TEXT.filter(bool).map(lambda s: (s + ".localhost").encode("utf-8")),
        field_value(),
    )


def authorization(good: dict[str, str]) -> st.SearchStrategy[bytes | None]:
    """An Authorization value (None: no header). ``good`` maps a name to a real key or token."""
    keys = list(good.values())
    return st.one_of(
        st.none(),
        st.sampled_from(keys).map(str.encode),
        st.tuples(st.sampled_from(["Bearer ", "bearer ", "BEARER ", "Bearer  ", "Bearer\t", "Basic ", "Token ",
                                   "Bearer Bearer ", " Bearer ", "Bearer", "Bearer:"]),
                  st.sampled_from(keys)).map(lambda t: (t[0] + t[1]).encode()),
        st.sampled_from(keys).map(lambda k: (k + "x").encode()),
        st.sampled_from(keys).map(lambda k: k[:-1].encode()),
        st.sampled_from(keys).map(lambda k: k.upper().encode()),
        st.sampled_from(["Bearer", "Bearer ", "lw_", "lw_" + "A" * 40, "null", "undefined", "Basic YWRtaW46YWRtaW4=",
                         "Bearer lw_not_a_key", "x" * 4000]).map(str.encode),
        st.tuples(st.sampled_from([b"", b"Bearer "]), field_value()).map(lambda t: t[0] + t[1]),
        st.tuples(st.sampled_from([b"", b"Bearer ", b"Bearer lw_"]), UNICODE_FIELD | FIELD_BYTES).map(
            lambda t: t[0] + t[1]),
    )


# ---- JSON --------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**63, max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    ANY_TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(ANY_TEXT, inner, max_size=5)),
    max_leaves=20,
)
# Any JSON value including integers orjson cannot hold (they are sent via the stdlib encoder).
WILD_JSON = st.one_of(JSON_VALUES, st.integers(min_value=-10**40, max_value=10**40),
                      st.sampled_from([2**63, -2**63 - 1, 2**64, -2**64, 10**400, -10**400]))


def dumps(value: Any) -> bytes:
    """JSON text for ``value`` with the stdlib encoder: big integers stay integers on the wire."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


def nested(depth: int, open_: str = "[", close: str = "]", leaf: str = "1") -> str:
    return open_ * depth + leaf + close * depth


DEPTHS = st.one_of(st.integers(1, 300), st.integers(250, 300), st.sampled_from([63, 64, 65, 255, 256, 257, 1023,
                                                                               1024, 1025, 2000, 3000]))


def deep_json() -> st.SearchStrategy[str]:
    return st.one_of(
        DEPTHS.map(nested),
        DEPTHS.map(lambda d: '{"a":' * d + "1" + "}" * d),
        DEPTHS.map(lambda d: nested(d, "[", "]", "") if d else "[]"),
    )


NUMBER_TOKENS = st.one_of(
    st.sampled_from(["NaN", "nan", "Infinity", "-Infinity", "inf", "1e400", "-1e400", "1e-400", "1E309", "-0",
                     "-0.0", "0e0", "1.", ".5", "01", "+1", "0x10", "1_000", "18446744073709551615",
                     "18446744073709551616", "-9223372036854775808", "-9223372036854775809", "1" + "0" * 5000,
                     "9" * 4400, "1e9999999999", "5e-324", "2.2250738585072014e-308", "1.7976931348623157e308"]),
    st.integers(1, 5000).map(lambda n: "1" + "0" * n),
)


def timeout_values() -> st.SearchStrategy[str]:
    """``timeout_seconds`` of every type, as JSON text."""
    return st.one_of(
        NUMBER_TOKENS,
        st.integers(min_value=-2**65, max_value=2**65).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        WILD_JSON.map(lambda v: dumps(v).decode()),
        st.sampled_from(['"5"', '"1"', "true", "false", "null", "[]", "{}", "[1]", '{"s": 1}', "1.5", "0.5", "0"]),
    )


def batch_items() -> st.SearchStrategy[list[Any]]:
    """A batch (``[[id, input], …]``) whose items may be malformed."""
    good_item = st.tuples(st.one_of(st.integers(-2**63, 2**63 - 1), SHORT_TEXT, st.floats(allow_nan=False,
                                    allow_infinity=False)), JSON_VALUES).map(list)
    bad_item = st.one_of(
        st.lists(JSON_VALUES, max_size=4).filter(lambda x: len(x) != 2),
        st.tuples(st.one_of(st.none(), st.booleans(), st.lists(JSON_SCALARS, max_size=2),
                            st.dictionaries(SHORT_TEXT, JSON_SCALARS, max_size=2)), JSON_VALUES).map(list),
        JSON_SCALARS,
        st.dictionaries(SHORT_TEXT, JSON_VALUES, max_size=2),
    )
    return st.one_of(
        st.lists(good_item, min_size=1, max_size=40),
        st.lists(st.one_of(good_item, bad_item), min_size=1, max_size=20),
        st.lists(good_item, min_size=60, max_size=90),  # big enough to be split across chunks
    )


def inference_body() -> st.SearchStrategy[bytes | None]:
    """An inference body: mostly JSON objects with ``data``, often not."""
    field = st.sampled_from(["timeout_seconds", "data", "Data", "inputs", "", "timeout", "__proto__", "data "])

    def obj(data: str, extra: list[tuple[str, str]]) -> bytes:
        parts = [f'"data": {data}'] + [f"{dumps(k).decode()}: {v}" for k, v in extra]
        return ("{" + ", ".join(parts) + "}").encode("utf-8")

    data_text = st.one_of(
        JSON_VALUES.map(lambda v: dumps(v).decode()),
        batch_items().map(lambda v: dumps(v).decode()),
        WILD_JSON.map(lambda v: dumps(v).decode()),
        NUMBER_TOKENS,
        deep_json(),
    )
    extras = st.lists(st.one_of(
        st.tuples(st.just("timeout_seconds"), timeout_values()),
        st.tuples(st.one_of(field, ANY_TEXT), WILD_JSON.map(lambda v: dumps(v).decode())),
    ), max_size=3)
    return st.one_of(
        st.builds(obj, data_text, extras),
        st.builds(obj, data_text, extras),
        st.builds(obj, data_text, extras),
        st.none(),
        st.sampled_from([b"", b" ", b"\n", b"{", b"}", b"[]", b"{}", b"null", b"1", b'"data"', b"{not json",
                         b'{"data": }', b'{"data": 1,}', b'{"data": 1} trailing', b'{"data": 1}{"data": 2}',
                         b"\xef\xbb\xbf" + b'{"data": 1}', b'{"data": "\xff"}', b'{"data": "\\ud800"}',
                         b'{"data": "\\u0000"}', b'{"data": 1, "data": 2}', b"\x00", b'{"data"\x00: 1}',
                         b'{"data": NaN}', b'{"data": [1, 2, 3,]}', b"\xff\xfe{\x00}\x00",
                         '{"data": "\N{LATIN SMALL LETTER E WITH ACUTE}"}'.encode("utf-16")]),
        st.binary(max_size=64),
        deep_json().map(str.encode),
        WILD_JSON.map(dumps),
    )


# ---- management ---------------------------------------------------------------------------

def any_json_text() -> st.SearchStrategy[str]:
    return st.one_of(WILD_JSON.map(lambda v: dumps(v).decode()), NUMBER_TOKENS, deep_json())


def json_object(fields: dict[str, st.SearchStrategy[str]], base: dict[str, str] | None = None,
                wild: bool = True) -> st.SearchStrategy[bytes]:
    """A JSON object: ``base`` (name → JSON text) with one to four of ``fields`` set over it.

    ``wild``: a field's value may be any JSON at all, unknown fields come too, ``base`` fields may be
    dropped, and sometimes the body is no object at all.
    """
    base = base or {}
    names = sorted(fields)

    def build(changes: list[tuple[str, str]], dropped: list[str]) -> bytes:
        chosen = dict(base)
        chosen.update(changes)
        for name in dropped:
            chosen.pop(name, None)
        return ("{" + ", ".join(f"{dumps(k).decode()}: {v}" for k, v in chosen.items()) + "}").encode("utf-8")

    if not wild:
        pair = st.sampled_from(names).flatmap(lambda n: st.tuples(st.just(n), fields[n]))
        return st.builds(build, st.lists(pair, min_size=1, max_size=4), st.just([]))
    pair = st.sampled_from(names).flatmap(lambda n: st.tuples(st.just(n), st.one_of(fields[n], fields[n],
                                                                                    any_json_text())))
    extra = st.tuples(st.one_of(SHORT_TEXT, st.sampled_from(["surprise", "version", "retired", "customer",
                                                              "image_id", "created_at"])), any_json_text())
    dropped = st.one_of(st.just([]), st.just([]), st.just([]), st.lists(st.sampled_from(sorted(base)), max_size=2)
                        if base else st.just([]))
    objects = st.builds(build, st.lists(st.one_of(pair, pair, pair, extra), min_size=1, max_size=4), dropped)
    return st.one_of(objects, objects, objects, objects, inference_body())


def ints(low: int, high: int) -> st.SearchStrategy[str]:
    return st.one_of(st.integers(low, high), st.integers(low - 10, high + 10),
                     st.sampled_from([0, -1, 2**31, 2**63, 2**64 - 1, 10**30])).map(str)


def deploy_fields(image: str) -> dict[str, st.SearchStrategy[str]]:
    env_names = st.one_of(st.sampled_from(["A", "PATH", "LUKEWARM_SOCKET", "LD_PRELOAD", "PYTHONPATH", "A\n",
                                           "1A", "A=B", "", "A B", "a" * 300, "É"]), SHORT_TEXT)
    env_values = st.one_of(SHORT_TEXT, st.integers(1, 300_000).map(lambda n: "v" * n), WILD_JSON)
    env = st.one_of(st.dictionaries(env_names, env_values, max_size=4).map(lambda d: dumps(d).decode()),
                    st.sampled_from(['{"A": 1}', '{"A": null}', '{"A": ["x"]}', '["A=1"]', '"A=1"']))
    cap_num = st.one_of(st.integers(-2, 6), st.sampled_from([1000, 1001, 2**63, 10**30]), st.none(),
                        st.sampled_from(["1", True, 1.5, [], {}]))
    capacity = st.one_of(
        st.fixed_dictionaries({}, optional={"min": cap_num, "desired": cap_num, "max": cap_num})
        .map(lambda d: dumps(d).decode()),
        st.sampled_from(['{"min": 0}', '{"max": 1}', '{"min": 2, "max": 1}', '{"min": null}', '{"desired": null}',
                         '{"max": null}', '{"min": 0, "extra": 1}', "[0, 1, 4]", '"1"']),
    )
    images = st.one_of(
        st.sampled_from([image, image, "lukewarm-acme/model:1", "lukewarm-globex/model:1", "lukewarm-acme",
                         "registry.example.com:5000/lukewarm-acme/m@sha256:" + "a" * 64, "python:3.11", "/",
                         "dir:/", "dir:", "dir:/nonexistent", "/nonexistent", "./x", "../x", "x" * 301, "x y",
                         "x\ny", "", "\u00e9", "lukewarm-acme/../x"]),
        SHORT_TEXT,
    ).map(lambda v: dumps(v).decode())
    entrypoints = st.one_of(st.sampled_from(["model:predict", "model:nope", "nope:predict", "no colon", ":", "a:",
                                             ":b", "a.b:c", "a:b:c", "1a:b", "a-b:c", "model:predict\n"]),
                            SHORT_TEXT).map(lambda v: dumps(v).decode())
    number = st.one_of(st.floats(allow_nan=False, allow_infinity=False).map(repr), ints(0, 4000),
                       NUMBER_TOKENS)
    boolean = st.sampled_from(["true", "false", "1", "0", '"true"', "null"])
    return {
        "image": images, "entrypoint": entrypoints, "env": env,
        "batch_size": ints(1, 100_000), "memory_mb": ints(32, 1_048_576), "gpu_memory_mb": ints(0, 1_048_576),
        "gpu": boolean, "keep_warm": boolean, "capacity": capacity,
        "idle_timeout_s": number, "timeout_s": number, "cpus": number,
    }


def patch_fields() -> dict[str, st.SearchStrategy[str]]:
    fields = deploy_fields("dir:/nonexistent")
    return {k: fields[k] for k in ("capacity", "idle_timeout_s", "keep_warm", "timeout_s", "image", "batch_size")}


def key_fields() -> dict[str, st.SearchStrategy[str]]:
    scopes = st.one_of(
        st.lists(st.sampled_from(["predict", "deploy", "admin", "", "PREDICT", "predict "]), max_size=4),
        st.lists(WILD_JSON, max_size=3),
    ).map(lambda v: dumps(v).decode())
    expires = st.one_of(NUMBER_TOKENS, ints(1, 10**9), st.floats(allow_nan=False, allow_infinity=False).map(repr),
                        st.sampled_from(['"3600"', "true", "null", "[]", "{}", "-1", "0"]))
    return {"scopes": st.one_of(scopes, st.sampled_from(['"predict"', "null", "{}", '[["predict"]]', "[{}]",
                                                         "[null]", "[1]"])),
            "expires_in_s": expires}


def alias_fields() -> dict[str, st.SearchStrategy[str]]:
    return {"version": st.one_of(ints(1, 5), st.sampled_from(['"1"', "1.0", "true", "null", "[1]", "{}", "1e3",
                                                              "18446744073709551616"]))}


def deploy_base(image: str) -> dict[str, str]:
    """What a well-formed deploy carries: the fuzzed fields go over it."""
    return {"image": dumps(image).decode(), "entrypoint": '"model:predict"'}


def management_body(image: str) -> st.SearchStrategy[bytes | None]:
    """Any management body, for a route that takes none or another one."""
    return st.one_of(
        json_object(deploy_fields(image), deploy_base(image)),
        json_object(patch_fields()),
        json_object(key_fields()),
        json_object(alias_fields()),
    )


# ---- the HTTP layer ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RawRequest:
    """Bytes sent as they are: a request the HTTP parser should refuse (its head always ends in CRLFCRLF)."""

    data: bytes
    method: bytes = b"RAW"

    def wire(self) -> bytes:
        return self.data

    @property
    def target(self) -> bytes:
        return self.data.split(b"\r\n", 1)[0]

    def __repr__(self) -> str:
        return f"RawRequest({_short(self.data, 400)})"


_CTL = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])


def http_garbage(host: bytes, key: bytes) -> st.SearchStrategy[RawRequest]:
    """A call of the echo model broken at the HTTP layer in one place."""
    body = b'{"data": 1}'

    def message(request_line: bytes = b"POST /v1/echo/latest HTTP/1.1", head: list[bytes] | None = None,
                payload: bytes = body, length: bool = True) -> bytes:
        lines = [request_line] + (head if head is not None else [b"Host: " + host, b"Authorization: " + key])
        if length:
            lines.append(b"Content-Length: %d" % len(payload))
        return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + payload

    good_head = [b"Host: " + host, b"Authorization: " + key]
    non_ascii = st.one_of(st.text(alphabet=PRINTABLE, min_size=1, max_size=8).map(lambda t: t.encode("utf-8"))
                          .filter(lambda b: not b.isascii()),
                          st.binary(min_size=1, max_size=8).map(lambda b: bytes(x | 0x80 for x in b)))
    ctl = st.sampled_from(list(_CTL)).map(lambda c: bytes([c])).filter(lambda c: c not in (b"\r", b"\n"))
    return st.one_of(
        # Bytes a request target may not hold raw.
        st.builds(lambda bad, at: message(b"POST /v1/echo/" + (b"latest"[:at] + bad + b"latest"[at:]) + b" HTTP/1.1"),
                  st.one_of(non_ascii, ctl, st.sampled_from([b" ", b"\\", b'"', b"<", b"{", b"|", b"^", b"`"])),
                  st.integers(0, 6)),
        # Control bytes in a header value.
        st.builds(lambda bad: message(head=[b"Host: " + host + bad, b"Authorization: " + key]), ctl),
        st.builds(lambda bad: message(head=[b"Host: " + host, b"Authorization: " + key + bad + b"x"]), ctl),
        # HTTP/1.1 without a Host, or with two.
        st.just(message(head=[b"Authorization: " + key])),
        st.just(message(head=[b"Host: " + host, b"Host: globex.localhost", b"Authorization: " + key])),
        # Over the parser's limits.
        st.integers(8190, 9000).map(lambda n: message(b"POST /v1/echo/" + b"a" * n + b" HTTP/1.1")),
        st.integers(8190, 9000).map(lambda n: message(head=good_head + [b"X-Big: " + b"x" * n])),
        st.integers(8190, 9000).map(lambda n: message(head=[b"Host: " + host, b"Authorization: " + b"k" * n])),
        st.integers(100, 400).map(lambda n: message(head=good_head + [b"X-%d: y" % i for i in range(n)])),
        # Methods, versions and header names that are no HTTP.
        st.sampled_from([b"FOO", b"post", b"P0ST", b"GET\x00", b"PO ST", b"\xc3\xa9", b"-", b"CONNECT", b"PRI"])
        .map(lambda m: message(m + b" /v1/echo/latest HTTP/1.1")),
        st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/9.9", b"HTTX/1.1", b"HTTP/1.1 x", b"HTTP/",
                         b"http/1.1", b"HTTP/1.10", b""])
        .map(lambda v: message(b"POST /v1/echo/latest " + v)),
        st.sampled_from([b"Bad Header: x", b"X\x00: y", b"(x): y", b": empty-name", b"X-\xc3\xa9: y", b" Folded: y",
                         b"\tfolded", b"NoColon", b"X-A:\x00"]).map(lambda h: message(head=good_head + [h])),
        # Framing: lengths and chunks that do not add up.
        st.sampled_from([b"abc", b"-1", b"1e3", b"0x10", b"99999999999999999999999", b"11, 12", b" ", b"+11"])
        .map(lambda n: message(head=good_head + [b"Content-Length: " + n], length=False)),
        st.just(message(head=good_head + [b"Content-Length: 11", b"Content-Length: 12"], length=False)),
        st.just(message(head=good_head + [b"Transfer-Encoding: chunked"],
                        payload=b"b\r\n" + body + b"\r\n0\r\n\r\n")),
        st.sampled_from([b"zz\r\n" + body + b"\r\n0\r\n\r\n", b"-1\r\n\r\n0\r\n\r\n",
                         b"b;ext=\x00\r\n" + body + b"\r\n0\r\n\r\n", b"fffffffffffffffffff\r\nx\r\n0\r\n\r\n",
                         b"0\r\nTrailer\x00: x\r\n\r\n"])
        .map(lambda chunks: message(head=good_head + [b"Transfer-Encoding: chunked"], payload=chunks, length=False)),
        st.sampled_from([b"gzip", b"chunked, gzip", b"identity", b"\xc3\xa9", b"chunked\x0b"])
        .map(lambda te: message(head=good_head + [b"Transfer-Encoding: " + te], length=False)),
        # Line endings and plain noise.
        st.just(message().replace(b"\r\n", b"\n")),
        st.just(message().replace(b"\r\n", b"\r")[:-1] + b"\r\n\r\n"),
        # (Noise of line ends alone is no request: servers skip empty lines before a request line, RFC 9112
        # 2.2, and close at the header deadline; both of ours do.)
        st.binary(min_size=1, max_size=64).map(lambda b: b.replace(b"\r\n\r\n", b"") + b"\r\n\r\n")
        .filter(lambda b: bool(b.strip(b"\r\n"))),
        st.just(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n"),  # a TLS ClientHello
        st.just(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),  # the HTTP/2 preface
    ).map(RawRequest)
