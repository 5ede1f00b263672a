"""The dashboard as an ASGI app (what `gist-curate serve` runs): app.py behind a check of the Host header.

A local tool bound to 127.0.0.1 can still be reached by a web page the user visits, through DNS rebinding
(evil.example resolving to 127.0.0.1): the browser then sends ``Host: evil.example``. Requests and websockets
whose Host is not a loopback name, or one listed in ``GIST_ALLOWED_HOSTS`` (comma-separated; set by
``serve --allow-host``), get 403. The project's Streamlit settings live in ``dashboard/.streamlit/config.toml``,
next to the app, so they apply wherever the server is started.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def allowed_hosts() -> set[str]:
    """Host names accepted in the Host header: loopback plus ``GIST_ALLOWED_HOSTS``."""
    extra = [h.strip().lower() for h in os.environ.get("GIST_ALLOWED_HOSTS", "").split(",") if h.strip()]
    return {*LOOPBACK_HOSTS, *extra}


def host_name(header: str) -> str:
    """The host part of a Host header, without the port ('[::1]:8501' → '::1', 'Example.org:80' → 'example.org')."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: 403 for HTTP requests and websockets whose Host header names another host."""

    def __init__(self, app, hosts: set[str] | None = None):
        self.app = app
        self.hosts = hosts if hosts is not None else allowed_hosts()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b"Forbidden: this dashboard answers only to localhost (start it with --allow-host NAME to allow another)."
                await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


app = st.App(str(Path(__file__).with_name("app.py")), middleware=[Middleware(HostCheck)])

if os.environ.get("GIST_RUN_DIR"):  # the first page after opening is then drawn from warm caches
    from dashboard.warmup import start

    start(os.environ["GIST_RUN_DIR"])
