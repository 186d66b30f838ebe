"""The HTML report opens in a real browser with no server and no network: headless Chromium, driven over the
DevTools protocol, records every request and console error, counts the rendered plots and takes a screenshot."""

import base64
import io
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from maskedclip.config import get_preset
from maskedclip.model import MaskedCLIP
from maskedclip.viz import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    attention_figure,
    prompt_heatmap_figure,
    reconstruction_figure,
    training_curves_figure,
    write_report,
)

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    return next((shutil.which(c) for c in CANDIDATES if shutil.which(c)), None)


class CDP:
    "A minimal DevTools-protocol client: numbered commands, events collected in order."

    def __init__(self, ws_url: str):
        import websocket  # websocket-client (a jupyter_server dependency)

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []

    def send(self, method: str, timeout: float = 30, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps(dict(id=mid, method=method, params=params)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(method)

    def wait_event(self, method: str, timeout: float = 30):
        for e in self.events:
            if e["method"] == method:
                return e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg
        raise TimeoutError(method)

    def close(self):
        self.ws.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    torch.manual_seed(0)
    model = MaskedCLIP(get_preset("tiny")).eval()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    disc = ((xx**2 + yy**2) < 0.8).float()
    img01 = disc * torch.tensor([0.8, 0.35, 0.15]).view(3, 1, 1) + 0.1 * torch.rand(
        2, 3, 64, 64, generator=torch.Generator().manual_seed(0)
    )
    images = (img01 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    lesion = np.zeros((64, 64), np.uint8)
    lesion[20:36, 36:52] = 255
    rows = [
        dict(step=s, lr=1e-3 * min(1.0, s / 4), loss=3 / s, mim=1 / s, lg_clip=2 / s, mfd=-0.05 * s)
        for s in range(1, 21)
    ]
    figs = {
        "reconstructions": reconstruction_figure(model, images, n=2),
        "attention": attention_figure(model, images[0]),
        "prompt heatmaps": prompt_heatmap_figure(
            model, images[0], ["hard exudates", "optic disc"], lesion_mask=lesion
        ),
        "training curves": training_curves_figure(rows),
        "label efficiency": _label_efficiency(),
    }  # four task panels: 1440 px wide as built
    path = write_report(
        tmp_path_factory.mktemp("report") / "report.html",
        figs,
        config=model.config,
        metrics=rows,
        title="browser test report",
    )
    return path, len(figs)


def _label_efficiency():
    import pandas as pd

    from maskedclip.evaluate import label_efficiency_figure

    rows = [
        dict(
            method=m,
            task=t,
            fraction=f,
            protocol="linear_probe",
            seed=s,
            auroc=0.6 + 0.1 * f + 0.05 * (m == "mae") + 0.01 * s,
        )
        for m in ("random", "mae")
        for t in ("dr_grade", "glaucoma", "amd", "multi_disease")
        for f in (0.01, 0.1, 1.0)
        for s in (0, 1)
    ]
    fig = label_efficiency_figure(pd.DataFrame(rows))
    assert fig.layout.width > 1280  # the case the report has to fit
    return fig


def _devtools_ws(proc, timeout=60) -> str:
    "Read Chromium's stderr until it prints the DevTools endpoint."
    q: queue.Queue = queue.Queue()

    def pump():
        for line in iter(proc.stderr.readline, b""):
            q.put(line.decode("utf-8", "replace"))

    threading.Thread(target=pump, daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(r"DevTools listening on (ws://\S+)", line)
        if m:
            return m.group(1)
    raise RuntimeError("chromium did not start its DevTools endpoint:\n" + "".join(seen[-20:]))


@pytest.mark.two_cores  # two processes / a browser: see tests/conftest.py
def test_report_renders_offline_in_chromium(report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not found (install: apt-get install -y chromium); CI installs it")
    from PIL import Image

    path, n_figs = report
    url = path.resolve().as_uri()
    args = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--mute-audio",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        "--window-size=1280,900",
        "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        browser_ws = _devtools_ws(proc)
        port = re.search(r"ws://[^:/]+:(\d+)/", browser_ws).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        cdp = CDP(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Network", "Runtime", "Log", "Page"):
            cdp.send(f"{domain}.enable")
        cdp.send(
            "Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False
        )
        cdp.events.clear()  # only what the report itself does
        cdp.send("Page.navigate", url=url)
        cdp.wait_event("Page.loadEventFired", timeout=60)
        # plotly draws synchronously while the scripts run; wait until every figure has its SVG
        expr = "document.querySelectorAll('.js-plotly-plot .main-svg').length"
        deadline, n_svg = time.monotonic() + 30, 0
        while time.monotonic() < deadline:
            n_svg = cdp.send("Runtime.evaluate", expression=expr, returnByValue=True)["result"]["value"]
            n_plots = cdp.send(
                "Runtime.evaluate",
                expression="document.querySelectorAll('.js-plotly-plot').length",
                returnByValue=True,
            )["result"]["value"]
            if n_plots == n_figs and n_svg >= n_figs:
                break
            time.sleep(0.25)
        assert n_plots == n_figs, f"{n_plots} of {n_figs} figures rendered"
        n_images = cdp.send(
            "Runtime.evaluate",
            expression="document.querySelectorAll('.js-plotly-plot g.imagelayer image').length",
            returnByValue=True,
        )["result"]["value"]
        assert n_images >= 2 * 4 + 1 + 2, (
            f"only {n_images} image panels drawn"
        )  # reconstructions + attention + prompts
        # nothing wider than the 1280 px window (no sideways scroll), and no figure title runs past its figure's edge
        scroll_w = cdp.send(
            "Runtime.evaluate", expression="document.documentElement.scrollWidth", returnByValue=True
        )["result"]["value"]
        assert scroll_w <= 1280, f"the page is {scroll_w} px wide in a 1280 px window (sideways scroll)"
        clipped = cdp.send(
            "Runtime.evaluate",
            returnByValue=True,
            expression="""
            [...document.querySelectorAll('.js-plotly-plot')].flatMap(p => {
              const box = p.querySelector('.main-svg').getBoundingClientRect();
              return [...p.querySelectorAll('.infolayer .gtitle, .infolayer .annotation-text')].filter(t => {
                const r = t.getBoundingClientRect(); return r.width > 0 && (r.left < box.left - 1 || r.right > box.right + 1);
              }).map(t => t.textContent.slice(0, 60));
            })""",
        )["result"]["value"]
        assert not clipped, f"titles cut off at the figure's edge: {clipped}"
        assert cdp.send(
            "Runtime.evaluate",
            returnByValue=True,
            expression="document.body.innerText.includes('MAE puts no loss on the visible patches')",
        )["result"]["value"]
        layout = cdp.send("Page.getLayoutMetrics")
        height = min(int((layout.get("cssContentSize") or layout["contentSize"])["height"]), 6000)
        shot = cdp.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip=dict(x=0, y=0, width=1280, height=height, scale=1),
        )
        png = base64.b64decode(shot["data"])
        (tmp_path / "report.png").write_bytes(png)
        if os.environ.get("MASKEDCLIP_SCREENSHOT"):
            open(os.environ["MASKEDCLIP_SCREENSHOT"], "wb").write(png)
        time.sleep(0.5)
        cdp.send("Runtime.evaluate", expression="1")  # flush pending events
        cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    requests = [
        e["params"]["request"]["url"] for e in cdp.events if e["method"] == "Network.requestWillBeSent"
    ]
    assert requests and requests[0] == url
    external = [u for u in requests if not u.startswith(("file://", "data:", "blob:"))]
    assert not external, f"the report made network requests: {external[:5]}"
    failed = [e["params"] for e in cdp.events if e["method"] == "Network.loadingFailed"]
    assert not failed, f"failed loads: {failed[:3]}"
    exceptions = [
        e["params"]["exceptionDetails"] for e in cdp.events if e["method"] == "Runtime.exceptionThrown"
    ]
    assert not exceptions, f"javascript exceptions: {exceptions[:3]}"
    console_errors = [
        e["params"]
        for e in cdp.events
        if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")
    ]
    log_errors = [
        e["params"]["entry"]
        for e in cdp.events
        if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
    ]
    assert not console_errors and not log_errors, f"console errors: {(console_errors + log_errors)[:3]}"

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape[1] == 1280 and img.shape[0] > 1500  # the whole page, not one screen
    non_white = (img < 245).any(-1).mean()
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert non_white > 0.05, f"screenshot is nearly blank ({non_white:.1%} non-white pixels)"
    assert colours > 500, f"only {colours} distinct colours: the plots did not render"
