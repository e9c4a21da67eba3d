"""The web chat page at `/` in a real headless browser (Debian's chromium through selenium's
chromedriver; `.ci/run` installs both): it loads, sends a message, shows the streamed reply,
stops a reply mid-stream, regenerates, sends a weighted adapter mix, and asks for the API key.

The server is the real Starlette app over the fake engine (tests/serve/fake_engine.py), whose
replies are deterministic and can be slowed per token, so the stop button has a stream to stop.
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.deps import missing, need
from tests.serve.fake_engine import FakeEngine, fake_text

webdriver = need("selenium.webdriver", "pip install selenium (in the test extra)")
from selenium.webdriver.common.by import By  # noqa: E402


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    binary, driver = _chromium(), shutil.which("chromedriver")
    if binary is None or driver is None:
        missing("a headless browser: apt-get install -y chromium chromium-driver (.ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


def _wait(predicate, timeout=15.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _open(browser, url):
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/")
    _wait(lambda: browser.find_element(By.ID, "status").text == "ready", what="the page to load its models")


def _say(browser, text):
    box = browser.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def _assistant(browser):
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def test_the_page_is_static_and_offline(make_server):
    """No CDN or other origin: every script and stylesheet is served by the app itself."""
    import httpx

    url = make_server(FakeEngine())
    page = httpx.get(url + "/").text
    assert "<script src=\"static/chat.js\"></script>" in page and "http" not in page.split("<body>")[1]
    assert httpx.get(url + "/static/chat.js").status_code == 200
    assert "fetch(\"v1/chat/completions\"" in httpx.get(url + "/static/chat.js").text


def test_a_message_gets_a_streamed_reply(browser, make_server):
    fake = FakeEngine(delay=0.01, max_model_len=4096)
    url = make_server(fake)
    _open(browser, url)
    _say(browser, "hello there")
    _wait(lambda: "streaming" not in _assistant(browser)[-1].get_attribute("class"), what="the reply to end")
    request = fake.calls[-1]
    want = fake_text(request.prompt_ids, None, 512).strip()
    got = _assistant(browser)[-1].text
    assert got.split()[:5] == want.split()[:5] and len(got) > 20, got
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "hello there"
    assert request.params.temperature == pytest.approx(0.7)


def test_stop_ends_the_stream_and_regenerate_replaces_the_reply(browser, make_server):
    fake = FakeEngine(delay=0.05, max_model_len=4096)  # 512 tokens at 50 ms: a stream that runs for ~25 s unless stopped
    url = make_server(fake)
    _open(browser, url)
    _say(browser, "tell me a long story")
    _wait(lambda: len(_assistant(browser)[-1].text) > 10, what="streamed text")
    browser.find_element(By.ID, "stop").click()
    _wait(lambda: "stopped" in _assistant(browser)[-1].text, timeout=5, what="the stopped mark")
    _wait(lambda: len(fake.aborted) >= 1, timeout=5, what="the server to abort the request")
    shown = _assistant(browser)[-1].text
    time.sleep(0.5)
    assert _assistant(browser)[-1].text == shown  # nothing more arrives after stop
    assert browser.find_element(By.ID, "send").is_enabled()
    regen = browser.find_element(By.ID, "regenerate")
    assert regen.is_enabled()
    n = len(fake.calls)
    regen.click()
    _wait(lambda: len(fake.calls) == n + 1, what="the regenerate request")
    browser.find_element(By.ID, "stop").click()
    _wait(lambda: "stopped" in _assistant(browser)[-1].text, timeout=5, what="the second stop")
    assert len(_assistant(browser)) == 1  # the reply was replaced, not added
    prompt = bytes(i for i in fake.calls[-1].prompt_ids if i < 256).decode()
    assert prompt == "<|user|>tell me a long story\n<|assistant|>"  # resent without the replaced reply


def test_a_weighted_mix_of_adapters(browser, make_server):
    fake = FakeEngine(delay=0.001, max_model_len=4096)
    fake.lora.update({"support": "/a/support", "legal": "/a/legal"})
    url = make_server(fake)
    _open(browser, url)
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert options[0] == "fake-model" and "support (adapter)" in options
    browser.find_element(By.ID, "mix-toggle").click()
    for name, weight in (("support", "0.7"), ("legal", "0.3")):
        box = browser.find_element(By.CSS_SELECTOR, f"#mix-rows input[data-adapter='{name}']")
        box.clear()
        box.send_keys(weight)
    _say(browser, "mixed")
    _wait(lambda: "streaming" not in _assistant(browser)[-1].get_attribute("class"), what="the reply to end")
    lora = fake.calls[-1].lora
    assert lora is not None and dict(zip(lora.adapters, lora.weights)) == pytest.approx({"support": 0.7, "legal": 0.3})


def test_the_page_asks_for_the_api_key(browser, make_server):
    url = make_server(FakeEngine(max_model_len=4096), api_key="s3cret")
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/")
    _wait(lambda: browser.find_element(By.ID, "key-box").is_displayed(), what="the key prompt")
    browser.find_element(By.ID, "api-key").send_keys("s3cret")
    browser.find_element(By.ID, "key-save").click()
    _wait(lambda: browser.find_element(By.ID, "status").text == "ready", what="models with the key")
    _say(browser, "hi")
    _wait(lambda: "streaming" not in _assistant(browser)[-1].get_attribute("class"), what="the reply")
    assert "error" not in _assistant(browser)[-1].get_attribute("class")
