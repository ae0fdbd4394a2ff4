"""An HTTP server on 127.0.0.1 for the remote-input tests: byte ranges, bytes counted, failures on request.

Run as ``python _range_server.py ROOT``: it prints ``PORT TOKEN`` and serves the files of
ROOT under ``/TOKEN/`` until it is stopped. It runs in a process of its own, not in a
thread of the tests: a GDAL call that holds the GIL while it waits for an answer would
otherwise wait on a server that cannot run. Only the standard library is imported.

Paths under ``/TOKEN/403/`` answer 403, under ``/TOKEN/hang/`` never answer, under
``/TOKEN/flaky/`` answer 503 to the first N requests (N set by ``/TOKEN/_control/flaky/N``);
other missing files answer 404. ``/TOKEN/_control/stats`` answers a JSON object with the
bytes of file content sent, the 503s given and the requests seen (method, path, Range);
``/TOKEN/_control/reset`` clears the bytes and the requests. The token makes every
server's URLs new to GDAL, which caches what it learnt of a URL for the life of a process.
"""

from __future__ import annotations

import http.server
import json
import re
import sys
import threading
import uuid
from pathlib import Path


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves the files of ``root`` under ``/<token>/`` with byte ranges; counts what it sends."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.token = root, uuid.uuid4().hex
        self.sent, self.flaky, self.failed = 0, 0, 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RangeServer

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _send(self, code: int, body: bytes = b"") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def _control(self, command: str) -> None:
        srv = self.server
        with srv.lock:
            if command == "reset":
                srv.sent = 0
                srv.requests.clear()
            elif command.startswith("flaky/"):
                srv.flaky, srv.failed = int(command.split("/", 1)[1]), 0
            stats = {"sent": srv.sent, "failed": srv.failed, "requests": srv.requests}
        self._send(200, json.dumps(stats).encode())

    def _answer(self, *, body: bool) -> None:
        srv = self.server
        path = self.path.split("?", 1)[0]
        prefix = f"/{srv.token}/"
        if path.startswith(prefix + "_control/"):
            return self._control(path[len(prefix + "_control/"):])
        with srv.lock:
            srv.requests.append((self.command, path, self.headers.get("Range")))
        if not path.startswith(prefix):
            return self._send(404)
        name = path[len(prefix):]
        if name.startswith("hang/"):
            srv.stopping.wait(120)
            return None
        if name.startswith("403/"):
            return self._send(403)
        if name.startswith("flaky/"):
            with srv.lock:
                fail = srv.failed < srv.flaky
                srv.failed += fail
            if fail:
                return self._send(503)
            name = name[len("flaky/"):]
        file = srv.root / name
        if not file.is_file():
            return self._send(404)
        data = file.read_bytes()
        start, end = 0, len(data) - 1
        ranged = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", ranged.strip()) if ranged else None
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else end, end)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        part = data[start:end + 1]
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if body:
            self.wfile.write(part)
            with srv.lock:
                srv.sent += len(part)
        return None


def main() -> None:
    server = RangeServer(Path(sys.argv[1]))
    print(server.server_address[1], server.token, flush=True)
    try:
        server.serve_forever()
    finally:
        server.stopping.set()
        server.server_close()


if __name__ == "__main__":
    main()
