"""`webkd inspect RUN --serve`: the run's review page on a local server, so that the page's
decisions reach the run without an export-and-import round trip.

A stdlib `http.server` bound to 127.0.0.1 only (port 0: a free port, printed). It serves the
rendered `gallery/` files and a small API:

    GET  /api/overrides        the store, {"version": 1, "entries": {...}}
    POST /api/overrides        {"entries": {id: entry}, "remove": [id]} -> merged into the store
    GET  /api/image?id=<id>    the original image of a manifest id (decoded, at most 768 px)

Writes go through `selection.overrides.record_page_decisions` (read-merge-replace under the
store's file lock, atomic) inside `pipeline.storage.run_lock`, as `webkd override` writes: while
another command holds the run (a distill, a refresh), a write is refused with that one line and
the page keeps the decision (and can still export it).

Only the page this server hands out can write: index.html carries a random token in a meta tag
(another site cannot read it: no CORS headers are ever sent) and a POST must echo it in the
`X-Webkd-Token` header (a custom header, so a cross-site request needs a preflight this server
never grants); a request whose Host is not this server's address is refused (DNS rebinding).
The served index.html allows `connect-src 'self'`; the static page keeps `connect-src 'none'`.
"""
from __future__ import annotations

import http.server
import io
import json
import logging
import mimetypes
import secrets
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from webkd.pipeline.paths import RunPaths
from webkd.pipeline.storage import RunLocked, run_lock
from webkd.selection.overrides import OverridesError, VERSION, load_entries, record_page_decisions

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_BODY = 8 << 20        # a POST larger than this is refused (a page sends one batch of decisions)
IMAGE_SIDE = 768


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "ReviewServer"
    server_version = "webkd-review"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one debug line per request
        log.debug("%s " + fmt, self.address_string(), *args)

    # ---- replies ----
    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def _error(self, code: int, message: str) -> None:
        self._json(code, {"error": message})

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        if self.headers.get("Host") in (f"{HOST}:{port}", f"localhost:{port}"):
            return True
        self._error(403, "wrong Host header (this server answers only to its own address)")
        return False

    # ---- GET ----
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            return self._send(200, self.server.index_html(), "text/html; charset=utf-8")
        if url.path == "/api/overrides":
            return self._json(200, self.server.store())
        if url.path == "/api/image":
            return self._image(parse_qs(url.query).get("id", [""])[0])
        self._static(url.path)

    do_HEAD = do_GET

    def _static(self, path: str) -> None:
        root = self.server.paths.gallery_dir.resolve()
        target = (root / path.lstrip("/")).resolve()
        if root not in target.parents or not target.is_file():
            return self._error(404, "not found")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(200, target.read_bytes(), ctype)

    def _image(self, record_id: str) -> None:
        rec = self.server.record(record_id)
        if rec is None:
            return self._error(404, "not a manifest id of this run")
        from PIL import Image

        from webkd.pipeline.ingest import load_rgb  # decoding lives in ingest (bomb guard, EXIF, modes)

        try:
            img = load_rgb(rec)
        except Exception as exc:  # a vanished file: the page falls back to the thumbnail
            return self._error(404, f"image unreadable: {type(exc).__name__}: {exc}")
        img = img.convert("RGB")
        img.thumbnail((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        self._send(200, buf.getvalue(), "image/jpeg")

    # ---- POST ----
    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/api/overrides":
            return self._error(404, "not found")
        if not secrets.compare_digest(self.headers.get("X-Webkd-Token", ""), self.server.token):
            return self._error(403, "missing or wrong X-Webkd-Token (reload the page from this server)")
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self._error(415, "send application/json")
        size = int(self.headers.get("Content-Length") or 0)
        if size <= 0 or size > MAX_BODY:
            return self._error(413, f"body of {size} bytes (1 to {MAX_BODY})")
        try:
            obj = json.loads(self.rfile.read(size))
        except (ValueError, UnicodeDecodeError) as exc:
            return self._error(400, f"not valid JSON ({exc})")
        try:
            with run_lock(self.server.paths.lock, "webkd inspect --serve (a gallery decision)"):
                ch = record_page_decisions(self.server.paths.overrides, obj)
        except RunLocked as exc:
            return self._error(409, str(exc))
        except OverridesError as exc:
            return self._error(400, str(exc))
        for line in ch.lines():
            log.info("page: %s", line)
        self.server.notify(ch)
        self._json(200, {"ok": True, "total": ch.total, "lines": ch.lines(), "store": self.server.store(),
                         "store_path": str(self.server.paths.overrides)})


class ReviewServer(http.server.HTTPServer):
    """One request at a time (writes are serialised; the run lock is per process)."""

    def __init__(self, run_dir: str | Path, port: int = 0,
                 on_write: Callable[[Any], None] | None = None) -> None:
        self.paths = RunPaths(Path(run_dir))
        if not self.paths.gallery.exists():
            raise FileNotFoundError(f"{self.paths.gallery}: no gallery page yet (webkd inspect {self.paths.root} --render)")
        self.token = secrets.token_urlsafe(24)
        self.on_write = on_write
        self._records: dict[str, Any] | None = None
        super().__init__((HOST, port), _Handler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    def index_html(self) -> bytes:
        page = self.paths.gallery.read_text(encoding="utf-8")
        page = page.replace("connect-src 'none'", "connect-src 'self'", 1)
        page = page.replace("<title>", f'<meta name="webkd-server" content="{self.token}">\n<title>', 1)
        return page.encode("utf-8")

    def store(self) -> dict[str, Any]:
        try:
            return {"version": VERSION, "entries": load_entries(self.paths.overrides)}
        except OverridesError as exc:
            return {"version": VERSION, "entries": {}, "error": str(exc)}

    def record(self, record_id: str) -> Any:
        if self._records is None:
            from webkd.pipeline.records import load_manifest

            self._records = {r.id: r for r in load_manifest(self.paths.manifest)} if self.paths.manifest.exists() else {}
        return self._records.get(record_id)

    def notify(self, changes: Any) -> None:
        if self.on_write is not None:
            self.on_write(changes)

    def start_thread(self) -> threading.Thread:
        """Serve from a daemon thread (tests, notebooks); `shutdown()` stops it."""
        t = threading.Thread(target=self.serve_forever, name="webkd-review", daemon=True)
        t.start()
        return t
