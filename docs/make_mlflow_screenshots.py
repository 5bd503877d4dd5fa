"""Screenshots of the MLflow UI for docs/mlflow.md: the runs table and the compare view of one small suite
logged for two built-in models (tiny-sd and shapesworld, 1 step, 64 px, offline).

    .nox/evalkit/bin/python docs/make_mlflow_screenshots.py        # writes docs/img/mlflow-runs.png, -compare.png

It starts ``mlflow server`` on 127.0.0.1 with a SQLite store in a temporary folder, logs the suite for both
models with :func:`evalkit.tracking.log_suite`, drives headless Chromium through its DevTools pipe (to close
the MLflow Assistant panel that opens on a first visit, and to wait for the data instead of a fixed time),
saves the PNGs and stops the server with its whole process group. tests/test_mlflow_ui.py reuses the helpers.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

MODELS = ("tiny-sd", "shapesworld")
SUITE = """
name: ui-check
model: {model}
sampler: {{steps: 1, guidance: 7.5, height: 64, width: 64}}
data: {{source: shapesworld, n: 2, seed: 0, size: 64}}
options: {{masks: reference}}
methods: [{{name: daam}}, {{name: raw-attn}}]
metrics: [{{name: miou-inf, params: {{tau: 0.4}}}}]
expect: ["daam.miou-inf_tau0.4 >= 0.0"]
"""
EXPERIMENT = "evalkit/ui-check"
SHARE_KEY = "evalkit-headline"  # the shared view that shows the suite runs' "<method>/<metric>" columns
RUNS_SIZE = (1600, 440)
COMPARE_SIZE = (1400, 1500)
# browser flags for a quiet, offline, throwaway headless Chromium
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium() -> str | None:
    """Debian's ``chromium`` (or ``chromium-browser``) on PATH, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    """A TCP port free on loopback right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 with a SQLite store under ``root``, in a session of its own (so that
    :func:`stop_server` can end its workers too); returns the process and the base URL once /health answers.
    Without the server's job runner (seven huey consumers for GenAI jobs, unused here), which makes it stop
    in about 2 s instead of 10 on a small machine."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """End the server's process group: SIGTERM, then SIGKILL after 20 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log_model(url: str, root: Path, model: str, pipe=None) -> tuple:
    """Run the small suite on ``model`` (``pipe``: an already loaded pipeline, else loaded by name) and log it
    to the server; returns ``(SuiteResult, run ids)`` as :func:`evalkit.tracking.log_suite` gives them."""
    from evalkit.suites import load_suite, run_suite
    from evalkit.tracking import log_suite

    folder = root / model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ui-check.yaml").write_text(SUITE.format(model=model))
    spec = load_suite(str(folder / "ui-check.yaml"))
    result = run_suite(spec, cache_dir=folder / "cache", progress=False, pipe=pipe)
    report = folder / "report.md"
    report.write_text(f"# ui-check on {model}\n")
    ids = log_suite(result, invocation_key=model, state_file=folder / "runs.json", tracking_uri=url,
                    artifacts=[report], samples_table=result.samples)
    return result, ids


def headline_keys(result) -> list[str]:
    """The suite run's method-prefixed metric keys (``daam/miou-inf_tau0.4``), as log_suite writes them."""
    from evalkit.tracking import metric_key

    return [f"{method}/{metric_key(metric)}" for method, metric in result.results]


def share_headline_view(url: str, experiment_id: str, keys: list[str]) -> str:
    """Store a shared runs-table view on the experiment (what the UI's Share button writes: an experiment tag
    ``mlflow.sharedViewState.<key>``) that shows ``keys`` as metric columns next to the run name and model;
    MLflow shows only attribute columns until a user picks metrics. Returns the share key."""
    from mlflow.tracking import MlflowClient

    columns = ["attributes.`Duration`", *(f"metrics.`{k}`" for k in keys), "params.`model`", "params.`data.n`"]
    # widths apply to the ids listed in columnOrder: the run name and the metric headers in full
    order = ["attributes.`Run Name`", "runDateAndNestInfo", "duration", *columns[1:]]
    widths = {"attributes.`Run Name`": 320, **{f"metrics.`{k}`": 8 * len(k) + 40 for k in keys}}
    state = {"selectedColumns": columns, "columnOrder": order, "columnWidths": widths,
             "orderByKey": "attributes.start_time", "orderByAsc": False}
    MlflowClient(url).set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(state))
    return SHARE_KEY


def runs_table_url(url: str, experiment_id: str, share_key: str | None = None) -> str:
    """The experiment's runs table in the "Model training" side bar, optionally in a shared view. MLflow 3.17's UI
    picks GenAI or Model training from its own toggle (default GenAI, remembered in the browser) or from the
    ``workflowType`` parameter; the experiment's ``mlflow.experimentKind`` tag does not decide it."""
    query = {"workflowType": "machine_learning", **({"viewStateShareKey": share_key} if share_key else {})}
    return f"{url}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def compare_url(url: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare view of ``run_ids`` (the route the runs table's Compare button opens)."""
    runs = urllib.parse.quote(json.dumps(run_ids, separators=(",", ":")))
    experiments = urllib.parse.quote(json.dumps([experiment_id]))
    return f"{url}/#/compare-runs?runs={runs}&experiments={experiments}&workflowType=machine_learning"


class Browser:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (DevTools messages, NUL-terminated JSON on
    fds 3 and 4): no WebSocket client and no extra package needed, one page, one session."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        devnull = os.open(os.devnull, os.O_WRONLY)
        actions = [(os.POSIX_SPAWN_DUP2, to_browser, 3), (os.POSIX_SPAWN_DUP2, from_browser, 4),
                   (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)]
        argv = [binary, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.pid = os.posix_spawn(binary, argv, os.environ, file_actions=actions, setsid=True)
        for fd in (to_browser, from_browser, devnull):
            os.close(fd)
        self._next_id, self._buffer, self.session = 0, b"", None
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        """Send one DevTools command (to the page's session once attached) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.time()))
                chunk = os.read(self._from_browser, 1 << 20) if ready else b""
                if not chunk:
                    raise RuntimeError(f"chromium gave no answer to {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, size: tuple[int, int], wait_for: list[str], timeout: float = 60) -> None:
        """Load ``url`` at ``size`` (CSS px) and wait until every string of ``wait_for`` is in the page's text."""
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", url=url)
        check = " && ".join(f"document.body.innerText.includes({json.dumps(s)})" for s in wait_for) or "true"
        deadline = time.time() + timeout
        while not self.evaluate(f"!!document.body && {check}"):
            if time.time() > deadline:
                raise RuntimeError(f"{url} did not show {wait_for} within {timeout:.0f} s")
            time.sleep(0.25)
        time.sleep(1.5)  # charts and column widths settle after the data arrives

    def screenshot(self, path: Path) -> None:
        """The viewport as a PNG file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        """Close the browser (and kill its session if it lingers)."""
        with contextlib.suppress(RuntimeError, OSError):  # the pipe may close before the answer
            self.call("Browser.close", timeout=10)
        for _ in range(40):
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.25)
        else:
            os.killpg(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self._to_browser)
        os.close(self._from_browser)


def without_assistant(browser: Browser, url: str) -> None:
    """Mark MLflow's Assistant panel as already auto-opened once and closed (its localStorage keys), as a user
    who closed it sees the UI; it would otherwise take a third of the width on a loopback server."""
    browser.call("Page.navigate", url=f"{url}/health")  # any page of the server's origin
    time.sleep(0.5)
    browser.evaluate("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                     "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")


def click(browser: Browser, aria_label: str) -> None:
    """Click the element with this aria-label, if there is one, and let the page react."""
    browser.evaluate(f"document.querySelector('[aria-label={json.dumps(aria_label)}]')?.click()")
    time.sleep(0.5)


def take_screenshots(browser: Browser, url: str, logged: dict, out: Path) -> None:
    """The runs table (shared headline view, its banner hidden) and the compare view of the suite runs (plots
    folded, metrics reduced to the rows where the runs differ, so that the headline rows need no scrolling)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    keys = headline_keys(next(iter(logged.values()))[0])
    share = share_headline_view(url, experiment_id, keys)
    parents = [ids["parent"] for _, ids in logged.values()]
    names = [client.get_run(run_id).info.run_name for run_id in parents]
    without_assistant(browser, url)
    browser.open(runs_table_url(url, experiment_id, share), RUNS_SIZE, [*names, *keys])
    click(browser, "Hide banner")
    browser.screenshot(out / "mlflow-runs.png")
    browser.open(compare_url(url, experiment_id, parents), COMPARE_SIZE, [*names, *keys])
    click(browser, "collapse Visualizations")  # its default plot (model vs claims_passed) says little here
    click(browser, "Metrics - Show diff only")
    browser.screenshot(out / "mlflow-compare.png")


def main(argv: list[str] | None = None) -> int:
    """Start a server, log both models, save the two screenshots, stop the server."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "img")
    args = parser.parse_args(argv)
    binary = chromium()
    if binary is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="evalkit-mlflow-") as tmp:
        root = Path(tmp)
        proc, url = start_server(root)
        try:
            logged = {model: log_model(url, root, model) for model in MODELS}
            browser = Browser(binary, root / "profile")
            try:
                take_screenshots(browser, url, logged, args.out)
            finally:
                browser.close()
        finally:
            stop_server(proc)
    for name in ("mlflow-runs.png", "mlflow-compare.png"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
