"""Take docs/img/dashboard.png: the service dashboard in headless Chromium, on ELPV solar cells.

The scores, verdicts, heat maps and log rows are real: PaDiM (the `gaikan fit` defaults, conformal
threshold at a false-alarm rate of 5 %) fitted on the ELPV mono training cells, then ``--n`` cells of
the test split inspected through the HTTP API by a line client. Staged, for the picture only: the
mix of cells (``--defect-share`` of them defective, the rest good, drawn with seed 0: the test split
itself is 313 of 489 defective, no line is), the rows' timestamps spread over the last 8 hours (an
SQL UPDATE of ``created``) so the time chart has a shape, and an operator ("tanaka") who reviews all
NG parts but the newest few using the data set's labels (good cell -> false alarm; defective cell ->
a defect type picked in turn from a short list, ELPV has no types). Needs chromium + chromedriver
(`make browser-deps`) and the selenium package.

    python tools/dashboard_screenshot.py --out docs/img/dashboard.png [--model DIR] [--n 160] [--defect-share 0.15]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

LINE_KEY, OPERATOR_KEY = "line-key-0001", "operator-key-0002"
DEFECT_TYPES = ["クラック (crack)", "断線 (finger break)", "黒点 (dark spot)"]
UNREVIEWED = 4
SPAN_S = 8 * 3600


def fit_model(out: Path) -> Path:
    from gaikan import pipeline

    det = pipeline.make_detector("padim")
    split = pipeline.load_split_for(det, "elpv:mono")
    pipeline.fit_detector(det, split, threshold_method="conformal", false_alarm_rate=0.05)
    det.save(out)
    return out


def serve(model: Path, data: Path):
    import uvicorn

    from gaikan.service.app import create_app

    app = create_app(model, data, [f"line-3={LINE_KEY}", f"tanaka={OPERATOR_KEY}"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    return srv, f"http://127.0.0.1:{port}"


def populate(url: str, data: Path, n: int, defect_share: float) -> None:
    from gaikan.data.datasets import load_data

    test = load_data("elpv:mono").test
    rng = np.random.default_rng(0)
    n_def = int(round(n * defect_share))
    order = np.concatenate([rng.choice(np.flatnonzero(test.labels == 1), n_def, replace=False),
                            rng.choice(np.flatnonzero(test.labels == 0), n - n_def, replace=False)])
    rng.shuffle(order)
    line = {"X-API-Key": LINE_KEY}
    results = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for k, i in enumerate(order):
            path = Path(test.paths[i])
            r = client.post("/v1/inspect", headers=line, data={"part_id": f"M-{2400 + k:05d}"},
                            files={"file": (path.name, path.read_bytes(), "image/png")})
            r.raise_for_status()
            results.append((r.json(), int(test.labels[i])))
        # spread the rows over the last 8 hours (the picture's time axis), oldest first
        now = time.time()
        rng = np.random.default_rng(1)
        stamps = np.sort(now - SPAN_S + rng.uniform(0, SPAN_S - 60, size=len(results)))
        db = sqlite3.connect(data / "inspections.sqlite3")
        for (item, _), t in zip(results, stamps):
            utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"
            db.execute("UPDATE inspections SET created = ?, created_utc = ? WHERE id = ?", (float(t), utc, item["id"]))
        db.commit()
        db.close()
        operator = {"X-API-Key": OPERATOR_KEY}
        ngs = [(item, label) for item, label in results if item["verdict"] == "NG"]
        for j, (item, label) in enumerate(ngs[:-UNREVIEWED]):
            body = {"label": "false_alarm"} if label == 0 else {"label": "defect",
                                                                 "defect_type": DEFECT_TYPES[j % len(DEFECT_TYPES)]}
            client.post(f"/v1/inspections/{item['id']}/review", json=body, headers=operator).raise_for_status()
        print(f"{len(results)} inspections, {len(ngs)} NG, {len(ngs) - UNREVIEWED} reviewed")


def screenshot(url: str, out: Path, width: int = 1360) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="gaikan-shot-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                 "--disable-background-networking", "--disable-dev-shm-usage", f"--window-size={width},1000",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url + "/")
        driver.execute_script(f"localStorage.setItem('gaikan-api-key', '{OPERATOR_KEY}')")
        driver.get(url + "/")
        driver.execute_script("const w = document.getElementById('window'); w.value = '28800';"
                              "w.dispatchEvent(new Event('change'))")
        deadline = time.time() + 60
        while time.time() < deadline:
            ready = driver.execute_script(
                "const imgs = [...document.querySelectorAll('#queue img, #reviews img, #grid img')];"
                "return document.fonts.status === 'loaded' && imgs.length > 0 && imgs.every((i) => i.naturalWidth > 0)"
                " && document.querySelectorAll('#chart-series rect').length > 0")
            if ready:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        height = driver.execute_script("return document.getElementById('inspections').offsetTop + 330")
        driver.set_window_size(width, height)
        time.sleep(0.5)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        print(f"wrote {out} ({width}x{height})")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img/dashboard.png"))
    ap.add_argument("--model", type=Path, help="a fitted model directory (default: fit PaDiM on elpv:mono)")
    ap.add_argument("--n", type=int, default=160, help="test cells to inspect")
    ap.add_argument("--defect-share", type=float, default=0.15, help="the share of defective cells among them")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gaikan-dashboard-") as tmp:
        model = args.model or fit_model(Path(tmp) / "model")
        srv, url = serve(model, Path(tmp) / "data")
        try:
            populate(url, Path(tmp) / "data", args.n, args.defect_share)
            screenshot(url, args.out)
        finally:
            srv.should_exit = True


if __name__ == "__main__":
    main()
