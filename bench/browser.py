"""Driving Debian chromium against `gist-curate serve` (Playwright): start the server, a browser with a new empty
profile, wait until the app is idle. Used by bench/dashboard_browser.py and tests/test_dashboard_browser.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip
VIEWPORT = {"width": 1500, "height": 1000}
# Idle: the script (or fragment) run has finished and no element is stale; then the page-specific condition.
IDLE_JS = """(app => app && app.getAttribute('data-test-script-state') === 'notRunning' && !document.querySelector('[data-stale="true"]'))
             (document.querySelector('[data-testid="stApp"]'))"""

def load() -> float:
    """The 1-minute load average."""
    return round(os.getloadavg()[0], 2)


def cpu_busy(window: float = 0.5) -> float:
    """Share of all cores busy over the next ``window`` seconds (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(window)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet_cpu(max_busy: float = 0.25, timeout: float = 30) -> float:
    """Wait until the machine is mostly idle (the server's background loading done); returns the seconds waited."""
    t0 = time.perf_counter()
    while cpu_busy() > max_busy and time.perf_counter() - t0 < timeout:
        pass
    return time.perf_counter() - t0


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(run_dir: Path, log_path: Path, cache_root: Path | None = None, timeout: float = 120, app: Path | None = None):
    """`gist-curate serve` on a free port for the duration of the block; yields its URL (the log goes to log_path).

    With ``app``, `streamlit run app` instead (with the dashboard's settings copied next to it).
    """
    port = free_port()
    env = os.environ | {"GIST_CACHE": str(cache_root or run_dir.parent), "PYTHONUNBUFFERED": "1", "GIST_DASH_TIMING": "1"}
    env.pop("GIST_RUN_DIR", None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "gist_backend.cli", "serve", "--run-dir", str(run_dir), "--port", str(port)]
    if app is not None:
        (app.parent / ".streamlit").mkdir(exist_ok=True)
        shutil.copyfile(ROOT / "dashboard" / ".streamlit" / "config.toml", app.parent / ".streamlit" / "config.toml")
        cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT if app is None else app.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                        break
                except OSError:
                    time.sleep(0.2)
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the dashboard server did not start; see {log_path}")
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # serve and its streamlit child
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def browser(playwright):
    """Chromium with a new empty profile, downloads allowed; yields a page."""
    profile = tempfile.mkdtemp(prefix="gist-chromium-")
    context = playwright.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), args=ARGS, headless=True,
                                                          viewport=VIEWPORT, accept_downloads=True)  # fmt: skip
    try:
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(120_000)
        yield page
    finally:
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(page, condition_js: str = "() => true", arg=None, timeout: float = 120) -> None:
    """Wait (polling every animation frame) until the app is idle and ``condition_js(arg)`` holds."""
    page.wait_for_function(f"(arg) => {IDLE_JS} && ({condition_js})(arg)", arg=arg, polling="raf", timeout=timeout * 1000)


def goto_view(page, title: str) -> None:
    """Switch view with the sidebar navigation and wait until it is drawn."""
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    page.wait_for_selector(f'h1:has-text("{title}")', timeout=120_000)
    wait_until(page)


def deploy_button_shown(page) -> bool:
    """Whether Streamlit's Deploy button (or any toolbar entry named Deploy) is on the page."""
    return bool(page.locator('[data-testid="stAppDeployButton"]').count() or page.get_by_role("button", name="Deploy").count())


@contextmanager
def screenshot_on_failure(page, path: Path):
    """Save a full-page screenshot when the block fails (to see what the browser showed)."""
    try:
        yield
    except BaseException:
        page.screenshot(path=str(path), full_page=True)
        print(f"failed; the page is in {path}", file=sys.stderr)
        raise


def server_times(log_path: Path) -> list[str]:
    """The per-script-run server timings the app printed (GIST_DASH_TIMING)."""
    return [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.startswith("[gist-dashboard]")]


