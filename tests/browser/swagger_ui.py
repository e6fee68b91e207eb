#!/usr/bin/env python3
"""Swagger UI at /docs/ in a real browser: Debian's headless Chromium driven by Selenium (PyPI).
tests/swagger_ui.rs starts the servers and runs this; it exits non-zero with a message on the
first failed check.

    python3 tests/browser/swagger_ui.py --url http://127.0.0.1:PORT --keyed-url http://...:PORT2 \\
        --screenshot target/swagger-ui.png
"""
import argparse
import json
import sys
import traceback
import urllib.request

from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from common import WAIT_SECONDS, browser, check

METHODS = ["get", "put", "post", "delete", "options", "head", "patch", "trace"]


def operations(base):
    """{"POST /classify", ...}: every operation in the server's OpenAPI document."""
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=30) as response:
        doc = json.load(response)
    return {f"{m.upper()} {path}" for path, item in doc["paths"].items() for m in METHODS if m in item}


def shown_operations(driver):
    """The operations the page lists, once it lists any."""
    blocks = driver.find_elements(By.CSS_SELECTOR, ".opblock")
    shown = set()
    for block in blocks:
        method = block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text.strip()
        path = block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path")
        shown.add(f"{method} {path}")
    return shown or False


def block_of(driver, method, path):
    for block in driver.find_elements(By.CSS_SELECTOR, f".opblock-{method.lower()}"):
        if block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path") == path:
            return block
    sys.exit(f"FAILED: no {method} {path} on the page")


def try_it_out(driver, wait, method, path):
    """Expands the operation, presses "Try it out" then "Execute"; (status, body, request URL)
    as the page shows them."""
    block = block_of(driver, method, path)
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, ".execute"))
    block.find_element(By.CSS_SELECTOR, ".execute").click()
    row = ".live-responses-table tbody tr.response"
    wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, f"{row} .response-col_status"))
    # The status cell may hold an "Undocumented" note after the code.
    status = block.find_element(By.CSS_SELECTOR, f"{row} .response-col_status").text.split()[0]
    body = block.find_element(By.CSS_SELECTOR, f"{row} .response-col_description pre").text
    url = block.find_element(By.CSS_SELECTOR, ".request-url pre").text.strip()
    driver.execute_script("arguments[0].scrollIntoView()", block.find_element(By.CSS_SELECTOR, ".request-url"))
    return status, body, url


def problems_in_console(driver):
    """Console errors other than the browser's own /favicon.ico request."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--keyed-url", required=True, help="a server started with --api-key")
    parser.add_argument("--screenshot", required=True)
    args = parser.parse_args()
    driver = browser(console=True)
    wait = WebDriverWait(driver, WAIT_SECONDS)
    try:
        driver.get(args.url + "/docs")
        check(driver.current_url == args.url + "/docs/", f"/docs redirects to the page ({driver.current_url})")
        shown = wait.until(shown_operations)
        expected = operations(args.url)
        check(shown == expected, f"the page lists every operation of /openapi.json ({len(expected)}; missing {sorted(expected - shown)}, extra {sorted(shown - expected)})")
        check({"POST /classify", "POST /embed", "GET /v1/models"} <= shown, "POST /classify, POST /embed and GET /v1/models among them")
        title = driver.find_element(By.CSS_SELECTOR, ".info .title").text
        check("fasternet-serve" in title, f"the document's title is shown: {title!r}")
        # Unstyled, the operations would still be listed; the method badges are coloured only
        # by Swagger UI's stylesheet.
        badge = driver.execute_script("return getComputedStyle(document.querySelector('.opblock-post .opblock-summary-method')).backgroundColor")
        check(badge not in ("rgba(0, 0, 0, 0)", "transparent"), f"Swagger UI's stylesheet is applied (POST badge {badge})")
        problems = problems_in_console(driver)
        check(not problems, f"no console errors, no Content-Security-Policy violations ({problems})")

        status, body, url = try_it_out(driver, wait, "GET", "/v1/models")
        check(url == args.url + "/v1/models", f"\"Try it out\" calls this server: {url}")
        check(status == "200" and "fasternet_t0.fashion_mnist" in body, f"GET /v1/models answers 200 with the model in the page ({status}, {body[:60]!r}...)")
        driver.save_screenshot(args.screenshot)
        print(f"screenshot: {args.screenshot}")

        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        elsewhere = [u for u in loaded if not u.startswith(args.url + "/")]
        check(loaded and not elsewhere, f"everything the page loaded came from this server ({len(loaded)} requests; elsewhere: {elsewhere})")
        problems = problems_in_console(driver)
        check(not problems, f"no console errors after \"Try it out\" either ({problems})")

        # With API keys the page and the document stay open; calls without a key get the API's 401.
        driver.get(args.keyed_url + "/docs/")
        shown = wait.until(shown_operations)
        check(shown == expected, "with API keys the page still lists every operation")
        status, body, _ = try_it_out(driver, wait, "GET", "/v1/models")
        check(status == "401" and "unauthorized" in body, f"... and a call without a key shows the API's 401 ({status}, {body[:80]!r})")
    except TimeoutException:
        # Say what the page was waiting for, and what the browser said meanwhile.
        traceback.print_exc()
        sys.exit(f"FAILED: the page did not get there in {WAIT_SECONDS} s (above); console: {problems_in_console(driver)}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
