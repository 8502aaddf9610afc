"""One live server per (checkpoint, flags) for the client-facing test modules (OpenAI SDK, lm-eval, client).

`start_server` (tests/service/conftest.py) is session scoped and stops every server at the end of the session;
this cache only lets several modules share one instead of paying a start each.
"""

from __future__ import annotations

API_KEY = "sk-logitserve-test"

_SERVERS: dict = {}


def shared_server(start_server, checkpoint, *flags: str, api_key: str | None = API_KEY):
    key = (str(checkpoint), flags, api_key)
    server = _SERVERS.get(key)
    if server is None or server.proc.poll() is not None:
        server = _SERVERS[key] = start_server(checkpoint, *flags, api_key=api_key)
    return server
