"""End to end in headless Chromium: the page at / asks for the API key, uploads a defective part
through the browser and shows it in the grid as NG with its heat map; the detail view and the
verdict filter work."""

import contextlib
import threading
import time

import httpx
import pytest

from gaikan.service.app import create_app
from serve_process import free_port

pytestmark = pytest.mark.browser
KEY = "browser-key"
HTTP_TIMEOUT = 120  # s: a loaded 2-core CI machine can take many seconds for the first inspection


@contextlib.contextmanager
def _serving(app):
    """The app on a free loopback port in a uvicorn thread; yields its base URL."""
    import uvicorn

    port = free_port()
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


@pytest.fixture
def server(service_model, tmp_path):
    with _serving(create_app(service_model, tmp_path / "data", KEY)) as url:
        yield url


def _wait(driver, condition, timeout=90.0, what="condition"):
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
                   headers={"X-API-Key": KEY}, timeout=HTTP_TIMEOUT)
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


OPERATOR_KEY = "operator-key-1"
LINE_KEY = "line-key-2"


@pytest.fixture
def named_server(service_model, tmp_path):
    with _serving(create_app(service_model, tmp_path / "data", [f"tanaka={OPERATOR_KEY}", f"line-3={LINE_KEY}"])) as url:
        yield url


# draws each character with the page's CJK web font only; a missing glyph would fall back to the
# same empty box for every character, so distinct pictures mean real glyphs
_FONT_CHECK = """
const done = arguments[arguments.length - 1];
(async () => {
  const family = '32px "Gaikan CJK"';
  await document.fonts.load(family, '外観');
  await document.fonts.load(family, '한们');
  const draw = (ch) => {
    const c = document.createElement('canvas'); c.width = 48; c.height = 48;
    const g = c.getContext('2d'); g.font = family; g.fillText(ch, 4, 38);
    return Array.from(g.getImageData(0, 0, 48, 48).data).join(',');
  };
  const glyphs = ['外', '観', '한', '们'].map(draw);
  const loaded = [...document.fonts].filter((f) => f.family.includes('Gaikan CJK') && f.status === 'loaded');
  done({loaded: loaded.length, distinct: new Set(glyphs).size, blank: glyphs.filter((g) => g === draw(' ')).length});
})().catch((e) => done({error: String(e)}));
"""


def test_dashboard_review_loop_false_alarm_then_defect_shrinks_the_queue(chrome, named_server, uploads):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    line = {"X-API-Key": LINE_KEY}
    good = httpx.post(f"{named_server}/v1/inspect", files={"file": ("g.png", uploads["good"][0], "image/png")},
                      headers=line, timeout=HTTP_TIMEOUT).json()
    ngs = [httpx.post(f"{named_server}/v1/inspect", data={"part_id": f"P-{i}"},
                      files={"file": ("d.png", data, "image/png")}, headers=line, timeout=HTTP_TIMEOUT).json()
           for i, data in enumerate(uploads["defect"][:2])]
    assert good["verdict"] == "OK" and [n["verdict"] for n in ngs] == ["NG", "NG"]

    chrome.get(named_server + "/")
    chrome.execute_script("localStorage.clear()")
    chrome.get(named_server + "/")
    chrome.find_element(By.ID, "api-key").send_keys(OPERATOR_KEY, Keys.TAB)
    _wait(chrome, "return document.getElementById('queue-count').textContent === '2' && "
                  "document.querySelectorAll('#queue .qcard').length === 2", what="a queue of two NG parts")
    # the key figures and both charts are drawn from /v1/stats
    assert chrome.find_element(By.ID, "kpi-n").text == "3"
    assert chrome.find_element(By.ID, "kpi-ng").text == "66.7%"
    assert chrome.execute_script("return document.querySelectorAll('#chart-series rect').length") >= 2
    assert chrome.execute_script("return !!document.getElementById('threshold-line')")
    assert chrome.find_element(By.ID, "drift").get_attribute("data-status") == "too_few"
    # the newest NG first, with its heat map
    first = chrome.execute_script("const c = document.querySelector('#queue .qcard');"
                                  "return [Number(c.dataset.id), c.innerText]")
    assert first[0] == ngs[1]["id"] and "P-1" in first[1]
    _wait(chrome, "return [...document.querySelectorAll('#queue .qcard')].every((c) => "
                  "c.querySelector('img.heatmap').naturalWidth > 0 && c.querySelector('img.thumb').naturalWidth > 0)",
          what="the queue's thumbnails and heat maps to load")

    chrome.execute_script(f"document.querySelector('#queue .qcard[data-id=\"{ngs[1]['id']}\"] button.fa').click()")
    _wait(chrome, "return document.getElementById('queue-count').textContent === '1' && "
                  "document.querySelectorAll('#queue .qcard').length === 1", what="the queue to shrink to one")
    _wait(chrome, "return document.querySelector('#reviews tbody').innerText.includes('false alarm')",
          what="the review in the recent list")
    row = chrome.execute_script("return document.querySelector('#reviews tbody tr').innerText")
    assert "tanaka" in row and "P-1" in row

    card = chrome.find_element(By.CSS_SELECTOR, f"#queue .qcard[data-id='{ngs[0]['id']}']")
    card.find_element(By.CSS_SELECTOR, "input.defect-type").send_keys("ひび割れ")
    card.find_element(By.CSS_SELECTOR, "button.defect").click()
    _wait(chrome, "return document.getElementById('queue-count').textContent === '0' && "
                  "!document.querySelector('#queue .qcard')", what="an empty queue")
    _wait(chrome, "return document.querySelector('#reviews tbody').innerText.includes('defect: ひび割れ')",
          what="the defect review in the recent list")

    # stored in the log with who (the key's name) and when
    reviews = httpx.get(f"{named_server}/v1/reviews", headers=line, timeout=HTTP_TIMEOUT).json()["items"]
    assert [(r["inspection_id"], r["reviewer"], r["label"], r["defect_type"]) for r in reviews] == [
        (ngs[0]["id"], "tanaka", "defect", "ひび割れ"), (ngs[1]["id"], "tanaka", "false_alarm", None)]
    assert all(r["created"] >= ngs[1]["created"] for r in reviews)

    # CJK text renders with the packaged web font (no system font assumed)
    chrome.set_script_timeout(30)
    font = chrome.execute_async_script(_FONT_CHECK)
    assert font == {"loaded": 2, "distinct": 4, "blank": 0}, font
