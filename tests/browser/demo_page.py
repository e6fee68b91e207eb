#!/usr/bin/env python3
"""The demo page in a real browser: Debian's headless Chromium driven by Selenium (PyPI).
tests/demo_page.rs starts the servers and runs this; it exits non-zero with a message on the
first failed check.

    python3 tests/browser/demo_page.py --url http://127.0.0.1:PORT --keyed-url http://...:PORT2 \\
        --key KEY --screenshot target/demo-page.png IMAGE...
"""
import argparse
import json
import os
import tempfile
import urllib.error
import urllib.request

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from common import WAIT_SECONDS, browser, check


def api_classify(base, path, k, key=None):
    """(status, [label, ...] or the error message) from POST /classify, as any client sees it."""
    with open(path, "rb") as f:
        body = f.read()
    request = urllib.request.Request(f"{base}/classify?top_k={k}", data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            doc = json.load(response)
            return response.status, [p["label"] for p in doc["results"][0]["predictions"]]
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)["error"]["message"]


def results_done(driver, count):
    """The first `count` results, once each shows labels or an error."""
    items = driver.find_elements(By.CSS_SELECTOR, "#results > li")
    if len(items) < count:
        return False
    done = [i for i in items if i.find_elements(By.CSS_SELECTOR, ".labels li") or i.find_element(By.CSS_SELECTOR, ".error").is_displayed()]
    return items if len(done) >= count else False


def shown(item):
    """(file name, [label, ...], error text or None) of one result."""
    name = item.find_element(By.CSS_SELECTOR, ".name").text
    labels = [row.find_element(By.CSS_SELECTOR, ".label").text for row in item.find_elements(By.CSS_SELECTOR, ".labels li")]
    error = item.find_element(By.CSS_SELECTOR, ".error")
    return name, labels, error.text if error.is_displayed() else None


def upload(driver, paths):
    driver.find_element(By.ID, "files").send_keys("\n".join(os.path.abspath(p) for p in paths))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--keyed-url", required=True, help="a server started with --api-key KEY")
    parser.add_argument("--key", required=True)
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("images", nargs="+")
    args = parser.parse_args()
    k = 3
    driver = browser(1100, 900)
    wait = WebDriverWait(driver, WAIT_SECONDS)
    try:
        driver.get(args.url + "/")
        check(driver.current_url.endswith("/ui/"), f"/ redirects to the page ({driver.current_url})")
        wait.until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        model = driver.find_element(By.ID, "model").text
        check("fasternet_t0.fashion_mnist" in model and "64×64" in model and "10 classes" in model, f"the model is described: {model}")

        # Keyboard only: the file picker, k and the key field are reachable with Tab.
        reached = []
        for _ in range(10):
            ActionChains(driver).send_keys(Keys.TAB).perform()
            reached.append(driver.switch_to.active_element.get_attribute("id"))
        check(all(i in reached for i in ["files", "topk", "key"]), f"Tab reaches the controls ({reached})")

        topk = driver.find_element(By.ID, "topk")
        topk.clear()
        topk.send_keys(str(k))
        upload(driver, args.images)
        items = wait.until(lambda d: results_done(d, len(args.images)))
        by_name = {shown(i)[0]: shown(i) for i in items}
        for path in args.images:
            name = os.path.basename(path)
            status, expected = api_classify(args.url, path, k)
            _, labels, error = by_name[name]
            check(status == 200 and error is None and labels == expected, f"{name}: the page shows /classify's top-{k} {expected} (shown {labels})")
        timings = items[0].find_element(By.CSS_SELECTOR, ".timings").text
        check(all(word in timings for word in ["decode", "queue", "forward", "ms"]), f"per-stage timings are shown: {timings}")
        driver.save_screenshot(args.screenshot)
        print(f"screenshot: {args.screenshot}")

        with tempfile.TemporaryDirectory() as tmp:
            corrupt = os.path.join(tmp, "corrupt.png")
            with open(args.images[-1], "rb") as source, open(corrupt, "wb") as f:
                f.write(source.read()[:300])  # cut inside the pixel data
            upload(driver, [corrupt])
            items = wait.until(lambda d: results_done(d, len(args.images) + 1))
            name, labels, error = shown(items[0])
            status, message = api_classify(args.url, corrupt, k)
            # The browser's text collapses runs of spaces.
            same = error is not None and error.split() == message.split()
            check(name == "corrupt.png" and same and status == 422, f"a corrupt file shows the API's message: {error!r} (API: {status} {message!r})")

        driver.set_window_size(390, 844)
        overflow = driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        check(overflow <= 1, f"readable at phone width (horizontal overflow {overflow} px)")
        driver.set_window_size(1100, 900)

        # A server with an API key: the page shows the 401, then works once the key is typed.
        driver.get(args.keyed_url + "/ui/")
        wait.until(lambda d: "API key" in d.find_element(By.ID, "model").text)
        check("API key" in driver.find_element(By.ID, "model").text, f"without a key: {driver.find_element(By.ID, 'model').text}")
        key = driver.find_element(By.ID, "key")
        key.send_keys(args.key)
        key.send_keys(Keys.TAB)
        wait.until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        upload(driver, args.images[:1])
        items = wait.until(lambda d: results_done(d, 1))
        _, labels, error = shown(items[0])
        status, expected = api_classify(args.keyed_url, args.images[0], 5, key=args.key)
        check(error is None and labels == expected[: len(labels)] and labels, f"with the key typed in: {labels}")
        stored = driver.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
        check(stored == [0, 0, ""], f"the key is kept only in the page's memory ({stored})")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
