"""Lukewarm model harness: serves one model over HTTP/1.1 on a Unix socket.

Standard library only: this file is mounted read-only into containers whose
image may hold nothing but python3, and the "process" runtime runs it on the
host. Configuration comes from the environment:

    LUKEWARM_ENTRYPOINT  module:function (required)
    LUKEWARM_SOCKET      path of the Unix socket to listen on (required)
    LUKEWARM_BATCH_SIZE  N: call the function with lists of up to N inputs
    LUKEWARM_CODE_DIR    directory put first on sys.path (default: the cwd)

Routes: GET /ready, POST /predict {"inputs": [...]}. Responses are JSON and
always carry Content-Length; no chunked encoding.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import json
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


# At most this much of a call's output is copied into the container's log.
ECHO_MAX_CHARS = 65536


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _describe(exc: BaseException) -> str:
    """'ValueError: bad input', or just the type name when the message is empty."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _format_tb(exc: BaseException) -> str:
    # Drop this file's own frames from the top: the user wants to see their code.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


class BatchShapeError(TypeError):
    """The entrypoint broke the batch contract; reported without a traceback."""


class Model:
    """Load state plus the (serialised) call into the user's function."""

    def __init__(self, entrypoint: str, batch_size: int | None) -> None:
        self.entrypoint = entrypoint
        self.batch_size = batch_size
        self.fn: Callable[[Any], Any] | None = None
        self.load_error: dict[str, Any] | None = None
        # One prediction at a time per replica; the call itself runs in the loop
        # thread, so this only orders requests that arrive on several connections.
        self.lock = asyncio.Lock()

    def load(self) -> None:
        """Import the entrypoint (runs in a worker thread so /ready can answer meanwhile)."""
        try:
            module_name, sep, attr = self.entrypoint.partition(":")
            if not sep or not module_name or not attr:
                raise ValueError(f"LUKEWARM_ENTRYPOINT must be module:function, got {self.entrypoint!r}")
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            if not callable(obj):
                raise TypeError(f"entrypoint {self.entrypoint} is {type(obj).__name__}, not callable")
            self.fn = obj
        except BaseException as exc:  # SystemExit from a module counts as a load failure too
            self.load_error = {"error": _describe(exc), "traceback": _format_tb(exc)}

    def _call(self, inputs: list[Any]) -> list[Any]:
        fn, n = self.fn, self.batch_size
        assert fn is not None
        if n is None:
            return [fn(x) for x in inputs]
        outputs: list[Any] = []
        for start in range(0, len(inputs), n):
            chunk = inputs[start:start + n]
            result = fn(chunk)
            if not isinstance(result, (list, tuple)) or len(result) != len(chunk):
                size = f"of length {len(result)}" if hasattr(result, "__len__") else "(not a list)"
                raise BatchShapeError(
                    f"entrypoint returned {type(result).__name__} {size} for a batch of {len(chunk)}")
            outputs.extend(result)
        return outputs

    def predict(self, inputs: list[Any], request_id: str = "") -> bytes:
        """Run the model over all inputs; always returns a 200 body (errors included). What the model
        printed also goes to the container's log, each line prefixed with the request's id."""
        out, err = io.StringIO(), io.StringIO()
        outputs: list[Any] | None = None
        error: str | None = None
        tb: str | None = None
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                outputs = self._call(inputs)
        except BatchShapeError as exc:
            error = f"TypeError: {exc}"
        except (Exception, SystemExit) as exc:  # a model calling sys.exit() must not kill the replica
            error, tb = _describe(exc), _format_tb(exc)
        infer_ms = round((time.perf_counter() - started) * 1000, 3)
        _echo(out.getvalue(), err.getvalue(), request_id)
        body = {"outputs": outputs, "stdout": out.getvalue(), "stderr": err.getvalue(),
                "error": error, "traceback": tb, "infer_ms": infer_ms}
        try:
            return _dumps(body)
        except (TypeError, ValueError, RecursionError) as exc:
            # Only outputs can fail: every other field is a str, float or None.
            body["outputs"] = None
            body["error"] = f"TypeError: output is not JSON serialisable: {exc}"
            return _dumps(body)


def _echo(stdout: str, stderr: str, request_id: str) -> None:
    """The call's captured output to the container's log (``docker logs``), each line tagged with the
    request id; bounded per call (the full text goes back in the answer)."""
    tag = f"[{request_id}] " if request_id else ""
    for stream, text in ((sys.__stdout__, stdout), (sys.__stderr__, stderr)):
        if stream is None or not text:
            continue
        lines = text[:ECHO_MAX_CHARS].splitlines()
        try:
            stream.write("".join(f"{tag}{line}\n" for line in lines))
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed log is no reason to fail the call


class Server:
    def __init__(self, model: Model) -> None:
        self.model = model

    def ready(self) -> tuple[int, bytes]:
        if self.model.fn is not None:
            return 200, b'{"ready":true}'
        if self.model.load_error is not None:
            return 500, _dumps({"ready": False, **self.model.load_error})
        return 503, b'{"ready":false,"error":"loading"}'

    async def predict(self, body: bytes) -> tuple[int, bytes]:
        if self.model.fn is None:
            if self.model.load_error is not None:
                return 500, _dumps({**self.model.load_error, "type": "load_error"})
            return 503, b'{"error":"loading","type":"not_ready"}'
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # Deep nesting exhausts the parser's recursion: an error for this call, not the replica's end.
            return 400, _dumps({"error": f"body is not JSON this harness can read: {type(exc).__name__}",
                                "type": "bad_request"})
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
            return 400, _dumps({"error": 'body must be {"inputs": [...]}', "type": "bad_request"})
        request_id = request.get("request_id")
        request_id = request_id if isinstance(request_id, str) and request_id.isprintable() else ""
        async with self.model.lock:
            return 200, self.model.predict(request["inputs"], request_id[:128])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests in sequence until the client closes or asks to."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # client went away between requests
                except asyncio.LimitOverrunError:
                    await self._send(writer, 431, _error("headers too large"), False)
                    return
                lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
                if not lines[0]:
                    continue  # stray CRLF between requests
                parts = lines[0].split(" ")
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    await self._send(writer, 400, _error("malformed request line"), False)
                    return
                method, target, version = parts
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                connection = headers.get("connection", "").lower()
                keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection

                # Framing: Content-Length only. Without it we cannot find the end
                # of a body, so the connection is closed after the error.
                length_text = headers.get("content-length")
                if "transfer-encoding" in headers or (length_text is None and method == "POST"):
                    await self._send(writer, 411, _error("Content-Length required"), False)
                    return
                try:
                    length = int(length_text or 0)
                    if length < 0:
                        raise ValueError(length_text)
                except ValueError:
                    await self._send(writer, 400, _error("bad Content-Length"), False)
                    return
                if length and headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits 1 s for this otherwise
                body = await reader.readexactly(length) if length else b""

                path = target.split("?", 1)[0]
                if path == "/predict":
                    status, data = await self.predict(body) if method == "POST" else (405, _error("use POST"))
                elif path == "/ready":
                    status, data = self.ready() if method == "GET" else (405, _error("use GET"))
                else:
                    status, data = 404, _dumps({"error": f"no route {path}", "type": "not_found"})
                await self._send(writer, status, data, keep_alive)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # client hung up mid-request: nobody to answer
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, keep_alive: bool) -> None:
        close = "" if keep_alive else "Connection: close\r\n"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{close}\r\n")
        writer.write(head.encode() + body)
        await writer.drain()


def _error(message: str) -> bytes:
    return _dumps({"error": message, "type": "bad_request"})


async def serve(socket_path: str, model: Model) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # stale socket from a previous run
    server = Server(model)
    # Listen before importing: the proxy polls /ready and gets 503 "loading"
    # instead of connection refused while a big model imports.
    srv = await asyncio.start_unix_server(server.handle, path=socket_path, limit=2**20)
    # Only the owner (the proxy is root, or the same user with the process runtime) may connect.
    os.chmod(socket_path, 0o600)
    print(f"lukewarm harness: listening on {socket_path}, loading {model.entrypoint}",
          file=sys.stderr, flush=True)
    # The import runs in a thread so the loop keeps answering /ready.
    await asyncio.to_thread(model.load)
    if model.load_error is not None:
        print(f"lukewarm harness: load failed: {model.load_error['error']}", file=sys.stderr, flush=True)
    async with srv:
        await srv.serve_forever()


def main() -> None:
    entrypoint = os.environ.get("LUKEWARM_ENTRYPOINT", "")
    socket_path = os.environ.get("LUKEWARM_SOCKET", "")
    if not entrypoint or not socket_path:
        sys.exit("lukewarm harness: LUKEWARM_ENTRYPOINT and LUKEWARM_SOCKET are required")
    batch_text = os.environ.get("LUKEWARM_BATCH_SIZE", "").strip()
    try:
        batch_size = int(batch_text) if batch_text else None
    except ValueError:
        sys.exit(f"lukewarm harness: LUKEWARM_BATCH_SIZE must be an integer, got {batch_text!r}")
    if batch_size is not None and batch_size < 1:
        batch_size = None

    # The script's own directory must not shadow user modules; the code dir comes first.
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        sys.path.pop(0)
    sys.path.insert(0, os.environ.get("LUKEWARM_CODE_DIR") or os.getcwd())

    def stop(signum: int, frame: object) -> None:
        # A plain handler (not loop.add_signal_handler) so that SIGTERM also
        # interrupts a model call that is blocking the loop thread.
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    asyncio.run(serve(socket_path, Model(entrypoint, batch_size)))


if __name__ == "__main__":
    main()
