"""What stands between the network (and the user's browser) and the routes: small ASGI middlewares, registered by
`install(app, settings)` in create_app.

- `HostGuard`: a request whose Host header names a host outside `--allowed-hosts` is refused (400), so that a web
  page that rebinds its own DNS name to 127.0.0.1 cannot read the answers of a server on the user's machine.
- `HeadAsGet`: HEAD is answered wherever GET is (the GET route runs; its headers are sent, its body is not).
- CORS (Starlette's `CORSMiddleware`) only for the `--cors-origins` given; none by default.
- No trailing-slash redirect: its Location would be built from the Host header.

The other half of browser safety is in `deps.read_body`: only `application/json` bodies are read (415 otherwise), so
a cross-site page cannot post without a CORS preflight that the server does not grant.
"""

from __future__ import annotations

import ipaddress
import logging

from starlette.middleware.cors import CORSMiddleware

from .errors import HostNotAllowed, error_response

logger = logging.getLogger("logitserve.app")

LOCAL_NAMES = ("localhost", "localhost.localdomain", "127.0.0.1", "::1")
# Addresses that bind every interface: the names the server is reached by are not known from them.
WILDCARD_BINDS = ("", "0.0.0.0", "::", "[::]")


def host_name(header: str) -> str:
    """The host of a Host header value, without its port, brackets or trailing dot, lower case."""
    value = header.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def local_hosts(bind: str) -> list[str]:
    """The bound address and the loopback names: always answered (a rebinding page's requests carry its own name)."""
    return ([] if bind.strip() in WILDCARD_BINDS else [host_name(bind)]) + [*LOCAL_NAMES, "*.localhost"]


def allowed_hosts(given: list[str], bind: str) -> list[str]:
    """--allowed-hosts and the local names; without it, any host for a server bound to every interface (reachable
    by names and addresses the server cannot know: a container's service name, a pod's IP)."""
    if not given and bind.strip() in WILDCARD_BINDS:
        return ["*"]
    return [*given, *local_hosts(bind)]


class AllowedHosts:
    def __init__(self, patterns: list[str]):
        self.any = "*" in patterns
        self.exact = {host_name(p) for p in patterns if not p.startswith("*.")}
        self.suffixes = tuple(p[1:].lower() for p in patterns if p.startswith("*."))  # ".example.com"

    def __contains__(self, name: str) -> bool:
        if self.any or name in self.exact or (self.suffixes and name.endswith(self.suffixes)):
            return True
        try:  # ::1 written another way (0:0:0:0:0:0:0:1)
            return ipaddress.ip_address(name).compressed in self.exact
        except ValueError:
            return False


class HostGuard:
    def __init__(self, app, allowed: AllowedHosts):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.allowed.any:
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        # No Host at all is an HTTP/1.0 client, never a browser: nothing to rebind.
        if host is None or host_name(host) in self.allowed:
            await self.app(scope, receive, send)
            return
        logger.info("refused a request for host %r (not in --allowed-hosts)", host[:100])
        message = f"the Host header names a host this server does not answer for ({host[:100]!r}); see --allowed-hosts"
        await error_response(HostNotAllowed(message, param="host"))(scope, receive, send)


class HeadAsGet:
    """HEAD runs the GET route; the body's messages are dropped (uvicorn sends no body for a HEAD request, and keeps
    the GET response's Content-Length)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def headers_only(message) -> None:
            nonlocal ended
            if message["type"] == "http.response.body":
                if ended:
                    return
                ended = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(dict(scope, method="GET"), receive, headers_only)


def install(app, settings) -> None:
    """Register the guards on `app` (the last added runs first: Host, then HEAD, then CORS)."""
    app.router.redirect_slashes = False
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "HEAD"],
                           allow_headers=["authorization", "content-type", "accept"],
                           expose_headers=["x-queue-time", "x-inference-time", "retry-after"])
    app.add_middleware(HeadAsGet)
    app.add_middleware(HostGuard, allowed=AllowedHosts(allowed_hosts(settings.allowed_hosts, settings.host)))
