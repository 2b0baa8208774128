import os

import pytest

# Two cores on the CI machines: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def defect_split():
    """Textured parts with injected defects (scratches, spots, cut-and-paste), 96x96, seeded."""
    from gaikan.data.synthetic import make_defect_dataset

    return make_defect_dataset(40, 20, 20, size=96, seed=7)


# ---- headless Chromium for the browser tests (@pytest.mark.browser) -------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
_BROWSER_SKIPS: list[str] = []


@pytest.fixture(scope="session")
def chrome(tmp_path_factory):
    """A headless Chromium driven by Selenium through the system chromedriver (nothing downloaded)."""
    import shutil

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"BROWSER TESTS NOT RUN: {', '.join(missing)} missing (run `make browser-deps`)"
        _BROWSER_SKIPS.append(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def pytest_terminal_summary(terminalreporter):
    for reason in dict.fromkeys(_BROWSER_SKIPS):
        terminalreporter.write_sep("!", reason, red=True, bold=True)
