"""The reviewers' web page: static files on the review service's HTTP port.

Envoy routes ``/review/`` here (the registration's ``http_routes``). The
page is three files (``static/``: HTML, one JS module, CSS) that call the
review service's own gRPC API from the browser as gRPC-Web, through Envoy's
``envoy.filters.http.grpc_web`` filter: there is no second API, and nothing
here reads a key or touches the queue. The service checks the reviewer's
key on every call, as for any gRPC client.

Only the fixed set of files is served (read once at start, never a path
from the request), GET and HEAD only, each with a strict
Content-Security-Policy: scripts, styles and fetches from this origin only,
no inline script or style, no plugins, no framing, and Trusted Types
enforced, so a string never reaches an HTML sink (the page builds its DOM
with ``createElement`` and ``textContent``; model outputs are untrusted).
``GET /healthz`` answers Envoy's health check.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

log = logging.getLogger("mlmesh.review.web")

PREFIX = "/review/"
# On shutdown, requests still open get this long to finish.
SHUTDOWN_GRACE_S = 2.0
# No request to these files has a body.
MAX_BODY_BYTES = 1024

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # gRPC-Web calls go to the same origin (Envoy).
        "connect-src 'self'",
        "img-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        # No string may reach innerHTML, outerHTML, document.write or eval
        # (browsers with Trusted Types refuse them), and no policy may be made.
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Small files; a reload always gets the running service's page.
    "Cache-Control": "no-cache",
}

# (file under static/, content type) for each path served.
FILES = {
    PREFIX: ("index.html", "text/html; charset=utf-8"),
    f"{PREFIX}index.html": ("index.html", "text/html; charset=utf-8"),
    f"{PREFIX}app.js": ("app.js", "text/javascript; charset=utf-8"),
    f"{PREFIX}style.css": ("style.css", "text/css; charset=utf-8"),
    f"{PREFIX}favicon.svg": ("favicon.svg", "image/svg+xml"),
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str


def load_files() -> dict[str, StaticFile]:
    """Every served path's bytes, read once from the package's static/."""
    folder = resources.files("mlmesh_review") / "static"
    cache: dict[str, bytes] = {}
    files = {}
    for path, (name, content_type) in FILES.items():
        if name not in cache:
            cache[name] = (folder / name).read_bytes()
        files[path] = StaticFile(cache[name], content_type)
    return files


class ReviewPage:
    """The page's HTTP server: ``start(host, port)`` returns the bound port."""

    def __init__(self) -> None:
        self.files = load_files()
        self.runner: web.AppRunner | None = None
        self.serving = False

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        for path, found in self.files.items():
            app.router.add_get(path, self._serve(found))  # GET also answers HEAD
        app.router.add_get("/healthz", self.health)
        return app

    async def start(self, host: str, port: int) -> int:
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.serving = True
        bound = int(self.runner.addresses[0][1])  # port 0: the one it got
        log.info("review page on http://%s:%d%s", host, bound, PREFIX)
        return bound

    async def close(self) -> None:
        """Health 503 at once, then stops (open requests get the grace)."""
        self.serving = False
        if self.runner is not None:
            await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.serving else 503, text="ok")

    @staticmethod
    def _serve(found: StaticFile) -> Callable[[web.Request], Awaitable[web.Response]]:
        headers = {**SECURITY_HEADERS, "Content-Type": found.content_type}

        async def serve(request: web.Request) -> web.Response:
            return web.Response(body=found.body, headers=headers)

        return serve
