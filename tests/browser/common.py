"""What the browser tests share: Debian's headless Chromium through Selenium, and `check`."""
import shutil
import sys

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

WAIT_SECONDS = 30


def browser(width=1200, height=900, console=False):
    """Headless Chromium with a `width`x`height` window; `console`: keep the browser's console
    log, to read Content-Security-Policy violations and script errors with get_log("browser")."""
    options = Options()
    for argument in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"]:
        options.add_argument(argument)
    if console:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def check(condition, message):
    """Exits with `FAILED: message` unless `condition`; prints `ok: message` otherwise."""
    if not condition:
        sys.exit(f"FAILED: {message}")
    print(f"ok: {message}", flush=True)
