"""End to end in headless Chromium: the page at / asks for the API key, uploads a defective part
through the browser and shows it in the grid as NG with its heat map; the detail view and the
verdict filter work."""

import socket
import threading
import time

import httpx
import pytest

from gaikan.service.app import create_app

pytestmark = pytest.mark.browser
KEY = "browser-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(service_model, tmp_path):
    import uvicorn

    app = create_app(service_model, tmp_path / "data", KEY)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def _wait(driver, condition, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.1)
    shown = driver.execute_script("return document.getElementById('error').textContent")
    raise AssertionError(f"timed out waiting for {what}; page error: {shown!r}")


def test_upload_through_the_page_shows_the_part_as_ng_with_its_heat_map(chrome, server, uploads, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # one good part inspected by a line client before the operator opens the page
    r = httpx.post(f"{server}/v1/inspect", files={"file": ("g.png", uploads["good"][0], "image/png")},
                   headers={"X-API-Key": KEY})
    assert r.json()["verdict"] == "OK"
    defect = tmp_path / "defect.png"
    defect.write_bytes(uploads["defect"][0])

    chrome.get(server + "/")
    _wait(chrome, "return document.getElementById('model').textContent.includes('padim')", what="model line")
    chrome.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)  # change event -> stored, grid loads
    _wait(chrome, "return document.querySelectorAll('.card').length == 1", what="the OK card")
    chrome.find_element(By.ID, "file").send_keys(str(defect))
    chrome.find_element(By.ID, "part-id").send_keys("browser-part-7")
    chrome.find_element(By.ID, "upload-button").click()
    _wait(chrome, "return document.getElementById('upload-status').textContent.includes('NG')", what="upload result")
    _wait(chrome, "return document.querySelectorAll('.card').length == 2", what="two cards")
    # the grid refreshes itself every 5 s: read it in one script, not through element handles
    first = chrome.execute_script("const c = document.querySelector('.card');"  # NG first
                                  "return [c.dataset.verdict, c.querySelector('.verdict').textContent, c.innerText]")
    assert first[0] == "NG" and first[1] == "NG"
    assert "browser-part-7" in first[2]
    _wait(chrome, "const c = document.querySelector('.card.NG');"
                  "return c.querySelector('img.heatmap').naturalWidth > 0 && c.querySelector('img.thumb').naturalWidth > 0",
          what="NG thumbnail and heat map to load")
    chrome.execute_script("document.querySelector('.card.NG').click()")
    _wait(chrome, "return document.getElementById('detail').open && "
                  "document.getElementById('detail-heatmap').naturalWidth > 0 && "
                  "document.getElementById('detail-overlay').naturalWidth > 0", what="detail view with heat map")
    assert "NG" in chrome.find_element(By.ID, "detail-title").text
    assert "p-value" in chrome.find_element(By.ID, "detail-table").text
    chrome.save_screenshot(str(tmp_path / "detail.png"))
    chrome.execute_script("document.getElementById('detail').close()")
    chrome.execute_script("const f = document.getElementById('filter'); f.value = 'OK';"
                          "f.dispatchEvent(new Event('change'))")
    _wait(chrome, "const cs = document.querySelectorAll('.card');"
                  "return cs.length == 1 && cs[0].dataset.verdict == 'OK'", what="the OK filter")
