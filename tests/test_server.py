"""The served dashboard: answers only to loopback Host names (DNS rebinding), and its settings apply wherever it starts."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, host: str, path: str = "/_stcore/health") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Host": host})
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.slow
def test_serve_refuses_foreign_host_headers(tmp_path):
    port = _free_port()
    env = {**os.environ, "GIST_ALLOWED_DIRS": str(tmp_path)}
    cmd = [sys.executable, "-m", "gist_backend.cli", "serve", "--port", str(port), "--allow-host", "curator.lan"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # not the repo's folder
    try:
        deadline = time.time() + 90
        while True:
            try:
                if _get(port, f"127.0.0.1:{port}") == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no answer"
            time.sleep(0.3)
        for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "curator.lan"):
            assert _get(port, host) == 200, host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example", ""):
            assert _get(port, host) == 403, host
            assert _get(port, host, "/") == 403, host
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_project_settings_apply_outside_the_repository(tmp_path):
    """Streamlit reads the settings next to the app's script, whatever the working folder."""
    script = f"""
import streamlit.config as c
c._main_script_path = {str(ROOT / 'dashboard' / 'server.py')!r}
c.get_config_options(force_reparse=True)
print(c.get_option("runner.magicEnabled"), c.get_option("server.fileWatcherType"), c.get_option("client.showErrorDetails"),
      c.get_option("client.toolbarMode"), c.get_option("server.address"), c.get_option("theme.primaryColor"))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "none", "type", "minimal", "127.0.0.1", "#3B6EA8"]


def test_host_names_are_parsed_like_a_browser_sends_them():
    from dashboard.server import host_name

    assert host_name("LocalHost:8501") == "localhost" and host_name("[::1]:8501") == "::1" and host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("evil.example:80") == "evil.example" and host_name("") == ""
