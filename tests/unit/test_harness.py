"""The model harness, run as a real subprocess and spoken to over its Unix socket."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "runtime_proxy" / "harness.py"
DEADLINE_S = 10.0


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = DEADLINE_S) -> None:
        super().__init__("harness", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    """Minimal HTTP/1.1 response reader for raw-socket tests."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


class Harness:
    def __init__(self, proc: subprocess.Popen[bytes], sock: str, logs: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.logs = logs

    def request(self, method: str, path: str, payload: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        conn = UnixHTTPConnection(self.sock)
        try:
            body = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def predict(self, inputs: list[Any]) -> dict[str, Any]:
        status, body = self.request("POST", "/predict", {"inputs": inputs})
        assert status == 200, body
        return body

    def poll_ready(self, until: Callable[[int, Any], bool]) -> tuple[int, Any]:
        """Poll /ready until `until(status, body)` holds, within the deadline."""
        deadline = time.monotonic() + DEADLINE_S
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"harness exited {self.proc.returncode}: {self.stderr()}")
            try:
                last = self.request("GET", "/ready")
                if until(*last):
                    return last
            except (FileNotFoundError, ConnectionRefusedError):
                pass  # not listening yet
            time.sleep(0.01)
        pytest.fail(f"/ready never reached the expected state; last {last}; stderr: {self.stderr()}")

    def wait_ready(self) -> None:
        status, body = self.poll_ready(lambda s, b: s != 503)
        assert (status, body) == (200, {"ready": True}), (status, body)

    def stdout(self) -> str:
        return (self.logs / "stdout").read_text()

    def stderr(self) -> str:
        return (self.logs / "stderr").read_text()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    # Unix socket paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    sock_dir = tempfile.mkdtemp(prefix="lwh")
    procs: list[subprocess.Popen[bytes]] = []

    def _start(modules: dict[str, str], entrypoint: str, batch_size: int | None = None,
               wait: bool = True) -> Harness:
        code = tmp_path / "code"
        code.mkdir(exist_ok=True)
        for name, source in modules.items():
            (code / f"{name}.py").write_text(textwrap.dedent(source))
        sock = os.path.join(sock_dir, f"h{len(procs)}.sock")
        env = {**os.environ, "LUKEWARM_ENTRYPOINT": entrypoint, "LUKEWARM_SOCKET": sock,
               "LUKEWARM_BATCH_SIZE": "" if batch_size is None else str(batch_size),
               "LUKEWARM_CODE_DIR": str(code)}
        logs = tmp_path / f"logs{len(procs)}"
        logs.mkdir()
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, str(HARNESS)], env=env, cwd=tmp_path,
                                    stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        procs.append(proc)
        harness = Harness(proc, sock, logs)
        if wait:
            harness.wait_ready()
        return harness

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE_S)
    shutil.rmtree(sock_dir, ignore_errors=True)


DOUBLE = {"model": "def predict(x):\n    return x * 2\n"}


def test_loading_then_ready_and_single_inputs(start: Callable[..., Harness], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    slow = f"""
        import os, time
        deadline = time.monotonic() + 10
        while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        def predict(x):
            return {{"double": x * 2}}
    """
    h = start({"slow": slow}, "slow:predict", wait=False)
    # The socket answers while the module is still importing.
    assert h.poll_ready(lambda s, b: True) == (503, {"ready": False, "error": "loading"})
    assert h.request("POST", "/predict", {"inputs": [1]})[0] == 503
    assert stat.S_IMODE(os.stat(h.sock).st_mode) == 0o600
    gate.touch()
    h.wait_ready()

    body = h.predict([1, 2, 3])
    assert body["outputs"] == [{"double": 2}, {"double": 4}, {"double": 6}]
    assert body["error"] is None and body["traceback"] is None
    assert body["stdout"] == "" and body["stderr"] == ""
    assert isinstance(body["infer_ms"], float) and body["infer_ms"] >= 0
    assert h.predict([])["outputs"] == []


def test_batches_are_consecutive_and_bounded(start: Callable[..., Harness]) -> None:
    model = """
        calls = []
        def predict(xs):
            calls.append(list(xs))
            return [{"x": x, "call": len(calls), "size": len(xs), "type": type(xs).__name__} for x in xs]
    """
    h = start({"batched": model}, "batched:predict", batch_size=3)
    outputs = h.predict(list(range(7)))["outputs"]
    assert [o["x"] for o in outputs] == list(range(7))
    assert [o["call"] for o in outputs] == [1, 1, 1, 2, 2, 2, 3]
    assert [o["size"] for o in outputs] == [3, 3, 3, 3, 3, 3, 1]
    assert {o["type"] for o in outputs} == {"list"}


def test_output_is_captured_per_call(start: Callable[..., Harness]) -> None:
    model = """
        import sys
        def predict(x):
            print("out", x)
            sys.stderr.write(f"err {x}\\n")
            return x
    """
    h = start({"noisy": model}, "noisy:predict")
    first = h.predict([1, 2])
    second = h.predict([3])
    assert (first["stdout"], first["stderr"]) == ("out 1\nout 2\n", "err 1\nerr 2\n")
    assert (second["stdout"], second["stderr"]) == ("out 3\n", "err 3\n")
    # Returned in the answer, and copied to the container's log, tagged with the request id when given.
    status, third = h.request("POST", "/predict", {"inputs": [4], "request_id": "req-9"})
    assert status == 200 and third["stdout"] == "out 4\n"
    assert h.stdout() == "out 1\nout 2\nout 3\n[req-9] out 4\n"
    assert h.stderr().endswith("err 3\n[req-9] err 4\n")


def test_model_exception_reported_with_traceback(start: Callable[..., Harness]) -> None:
    model = """
        class Quiet(Exception):
            pass
        def predict(x):
            print("before", x)
            if x == "quiet":
                raise Quiet()
            if x < 0:
                raise ValueError("bad input")
            return x
    """
    h = start({"picky": model}, "picky:predict")
    body = h.predict([1, -1, 2])
    assert body["outputs"] is None
    assert body["error"] == "ValueError: bad input"
    assert body["traceback"].startswith("Traceback")
    assert 'raise ValueError("bad input")' in body["traceback"]
    assert "harness.py" not in body["traceback"]
    assert body["stdout"] == "before 1\nbefore -1\n"
    assert h.predict(["quiet"])["error"] == "Quiet"
    # The replica keeps serving after a failing call.
    assert h.predict([5])["outputs"] == [5]


@pytest.mark.parametrize(("modules", "entrypoint", "error"), [
    ({}, "nope:predict", "ModuleNotFoundError: No module named 'nope'"),
    (DOUBLE, "model:missing", "AttributeError: module 'model' has no attribute 'missing'"),
    ({"broken": "raise RuntimeError('no weights')\n"}, "broken:predict", "RuntimeError: no weights"),
    (DOUBLE, "model", "ValueError: LUKEWARM_ENTRYPOINT must be module:function, got 'model'"),
])
def test_load_failure(start: Callable[..., Harness], modules: dict[str, str], entrypoint: str,
                      error: str) -> None:
    h = start(modules, entrypoint, wait=False)
    status, body = h.poll_ready(lambda s, b: s != 503)
    assert status == 500
    assert body["ready"] is False and body["error"] == error
    assert error.split(":")[0] in body["traceback"]
    status, body = h.request("POST", "/predict", {"inputs": [1]})
    assert status == 500 and body["error"] == error
    assert h.proc.poll() is None  # still serving, so the proxy can show the error


@pytest.mark.parametrize(("returns", "error"), [
    ("xs[:1]", "TypeError: entrypoint returned list of length 1 for a batch of 2"),
    ("None", "TypeError: entrypoint returned NoneType (not a list) for a batch of 2"),
    ("{'a': 1, 'b': 2}", "TypeError: entrypoint returned dict of length 2 for a batch of 2"),
])
def test_batch_of_wrong_shape(start: Callable[..., Harness], returns: str, error: str) -> None:
    h = start({"short": f"def predict(xs):\n    print('hi')\n    return {returns}\n"},
              "short:predict", batch_size=2)
    body = h.predict([1, 2, 3])
    assert body["outputs"] is None and body["error"] == error
    assert body["stdout"] == "hi\n"


def test_unserialisable_output(start: Callable[..., Harness]) -> None:
    h = start({"sets": "def predict(x):\n    return {x} if x else x\n"}, "sets:predict")
    body = h.predict([0, 1])
    assert body["outputs"] is None
    assert body["error"].startswith("TypeError: output is not JSON serialisable: ")
    assert "set" in body["error"]
    assert h.predict([0])["outputs"] == [0]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"input": [1]}', b'{"inputs": 5}', b"\xff"])
def test_malformed_body_is_400(start: Callable[..., Harness], raw: bytes) -> None:
    h = start(DOUBLE, "model:predict")
    status, body = h.request("POST", "/predict", raw=raw)
    assert status == 400 and body["type"] == "bad_request"


def test_json_deeper_than_its_parser_survives_is_400_and_the_harness_lives(start: Callable[..., Harness]) -> None:
    """Any predict key could otherwise kill replicas with a nested body and force cold starts."""
    h = start(DOUBLE, "model:predict")
    depth = 100_000
    status, body = h.request("POST", "/predict", raw=b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}")
    assert status == 400 and body["type"] == "bad_request"
    assert h.predict([2])["outputs"] == [4]
    assert h.proc.poll() is None


def test_routes_and_framing(start: Callable[..., Harness]) -> None:
    h = start(DOUBLE, "model:predict")
    status, body = h.request("GET", "/nowhere")
    assert status == 404 and body["type"] == "not_found"
    assert h.request("GET", "/predict")[0] == 405
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(DEADLINE_S)
        s.connect(h.sock)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        status, headers, _ = read_response(s.makefile("rb"))
        assert status == 411 and headers["connection"] == "close"


def test_keep_alive_and_connection_close(start: Callable[..., Harness]) -> None:
    h = start(DOUBLE, "model:predict")
    request = b'POST /predict?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n%s\r\n{"inputs": [%d]}'
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(DEADLINE_S)
        s.connect(h.sock)
        f = s.makefile("rb")
        s.sendall(request % (b"", 1))
        status, headers, body = read_response(f)
        assert status == 200 and json.loads(body)["outputs"] == [2] and "connection" not in headers
        s.sendall(request % (b"Connection: close\r\n", 2))
        status, headers, body = read_response(f)
        assert status == 200 and json.loads(body)["outputs"] == [4]
        assert headers["connection"] == "close"
        assert f.read() == b""  # the server closed its end


def test_sigterm_exits_promptly_even_mid_call(start: Callable[..., Harness], tmp_path: Path) -> None:
    called, returned = tmp_path / "called", tmp_path / "returned"
    model = f"""
        import time
        def predict(x):
            open({str(called)!r}, 'w').close()
            time.sleep(x)
            open({str(returned)!r}, 'w').close()
    """
    h = start({"sleepy": model}, "sleepy:predict")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(DEADLINE_S)
        s.connect(h.sock)
        # The call sleeps an hour: an exit that waited for it would not come within the bounded wait below.
        s.sendall(b'POST /predict HTTP/1.1\r\nContent-Length: 18\r\n\r\n{"inputs": [3600]}')
        deadline = time.monotonic() + DEADLINE_S
        while not called.exists():
            assert time.monotonic() < deadline, "the model was never called"
            time.sleep(0.01)
        h.proc.send_signal(signal.SIGTERM)
        assert h.proc.wait(timeout=DEADLINE_S) == 0, "a clean exit, not death by the signal"
        assert s.recv(1) == b"", "the call was cut off: the connection closed without an answer"
    assert not returned.exists(), "the model call never finished"
    assert not os.path.exists(h.sock)


def test_sigterm_when_idle(start: Callable[..., Harness]) -> None:
    h = start(DOUBLE, "model:predict")
    h.proc.send_signal(signal.SIGTERM)
    assert h.proc.wait(timeout=5) == 0
    assert h.stdout() == ""
