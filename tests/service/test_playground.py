"""GET /: the playground page, driven in a real headless Chromium (Debian's `chromium` + `chromium-driver`, through
selenium): typed text becomes tokens whose ids, texts, log-probabilities, ranks and top alternatives are those of
/tokenize, /detokenize and /v1/logits, and the perplexity is theirs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.shared_servers import API_KEY, shared_server

TEXT = "The quick brown fox jumps over the lazy dog.\nLanguage models score text by predicting the next token."
TOP_K = 5


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return shared_server(start_server, tiny_checkpoint)


# ------------------------------------------------------------------------------------------ without a browser
def test_page_and_assets_are_served_without_a_key(server):
    page = httpx.get(server.url + "/", timeout=10)  # the server has an API key; the page itself needs none
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(refs) == ["static/playground.css", "static/playground.js"]
    for ref, kind in (("static/playground.css", "text/css"), ("static/playground.js", "text/javascript")):
        r = httpx.get(f"{server.url}/{ref}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        # Works offline: nothing is loaded from another host.
        assert not re.search(r"https?://|//cdn|@import", r.text), ref
    assert not re.search(r"https?://", page.text)
    missing = httpx.get(server.url + "/static/other.js", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"]
    assert "/" not in httpx.get(server.url + "/openapi.json", headers=server.headers, timeout=10).json()["paths"]


# --------------------------------------------------------------------------------------------- in a browser
def _browser_paths() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pyproject test extra)")
    paths = _browser_paths()
    if paths is None:
        pytest.skip("no headless Chromium: install Debian's chromium and chromium-driver (.ci/run does, as root)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900",
                "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait_scored(driver, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script("return !document.body.dataset.busy && !!(document.querySelector('#tokens .tok') "
                                   "|| !document.getElementById('error').hidden)"))


def _tokens(driver) -> list[dict]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#tokens .tok')).map(s => ({...s.dataset,"
        " background: getComputedStyle(s).backgroundColor}))")


def _api(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def probability_text(logprob: float) -> str:
    """The page's formatting of exp(logprob): a percentage, or scientific below 0.1%."""
    p = math.exp(logprob)
    if p >= 0.001:
        return f"{100 * p:.1f}%"
    mantissa, exponent = f"{p:.1e}".split("e")
    return f"{mantissa}×10^{int(exponent)}"


def tooltip_text(text: str) -> str:
    """The page's tooltip form of a token's text: JSON escapes, spaces as ␣."""
    return json.dumps(text, ensure_ascii=False)[1:-1].replace(" ", "␣")


def _type(driver, selector: str, text: str):
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, selector)
    box.clear()
    box.send_keys(text)


def check_scored_text(driver, server, text: str, top_k_check: bool = True) -> dict:
    """Type `text`, wait for the tokens, and check every shown number against the API; returns the API's row."""
    _type(driver, "#text", text)
    ids = _api(server, "/tokenize", {"prompt": text, "add_special_tokens": True})["tokens"]
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 120, poll_frequency=0.1).until(lambda d: not d.execute_script(
        "return document.body.dataset.busy") and len(_tokens(d)) == len(ids) and d.execute_script(
        "return document.getElementById('token-count').textContent") == str(len(ids)))
    shown = _tokens(driver)
    row = _api(server, "/v1/logits", {"inputs": text, "return_logits": "all", "logits": False,
                                      "target_logprobs": True, "top_k": TOP_K})["data"][0]
    assert row["num_tokens"] == len(shown) == len(ids)
    assert [int(t["id"]) for t in shown] == ids
    # Token texts are the decoded text, cut at token boundaries.
    whole = _api(server, "/detokenize", {"tokens": ids})["prompt"]
    assert "".join(t["text"] for t in shown) == whole
    # Token i shows row i-1's log-prob of it, exactly (the same float64 after a JSON round trip).
    assert "logprob" not in shown[0]
    assert [float(t["logprob"]) for t in shown[1:]] == row["target_logprobs"][:-1]
    lps = np.array(row["target_logprobs"][:-1], dtype=np.float64)
    ppl = math.exp(-lps.mean())
    assert driver.find_element("id", "perplexity").text == f"{ppl:.2f}"
    assert driver.find_element("id", "token-count").text == str(len(ids))
    if top_k_check:
        # Ranks against the full vocabulary: exact where the server reports target_ranks, else exact within the
        # top k and ">k" below it.
        exact = server_reports_ranks(server)
        logits = _api(server, "/v1/logits", {"input_ids": [ids], "return_logits": "all"})["data"][0]["logits"]
        for i in range(1, len(ids)):
            scores = np.array(logits[i - 1])
            rank = 1 + int((scores > scores[ids[i]]).sum())
            assert shown[i]["rank"] == (str(rank) if exact or rank <= TOP_K else f">{TOP_K}"), i
    return row


def server_reports_ranks(server) -> bool:
    """Whether /v1/logits takes `target_ranks` (the page then shows exact ranks and GLTR's buckets)."""
    r = httpx.post(server.url + "/v1/logits", json={"input_ids": [[1, 2]], "return_logits": "all", "logits": False,
                                                    "target_ranks": True}, headers=server.headers, timeout=60)
    assert r.status_code in (200, 422), r.text
    return r.status_code == 200


@pytest.mark.timeout(300)
def test_typed_text_is_scored_token_by_token(browser, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(server.url + "/")
    # No key yet on a server that wants one: the API's message, shown on the page.
    _wait_scored(driver)
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed() and "API key" in error.text
    assert not _tokens(driver)

    _type(driver, "#api-key", API_KEY + "\t")  # the change event scores the sample text
    _wait_scored(driver)
    assert not error.is_displayed()
    row = check_scored_text(driver, server, TEXT)

    # Hover a token: its top alternatives with their probabilities, the actual token marked where it is among them.
    spans = driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    i = 3
    ActionChains(driver).move_to_element(spans[i]).perform()
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.getElementById('tip').dataset.ready"))
    tip = driver.find_element(By.ID, "tip")
    assert tip.is_displayed()
    alternatives = driver.execute_script(
        "return Array.from(document.querySelectorAll('#tip tr.alternative')).map(r => ({id: +r.dataset.id,"
        " logprob: +r.dataset.logprob, actual: r.classList.contains('actual'),"
        " cells: Array.from(r.cells).map(c => c.textContent)}))")
    assert [a["id"] for a in alternatives] == row["top_k"]["ids"][i - 1]
    assert [a["logprob"] for a in alternatives] == row["top_k"]["logprobs"][i - 1]
    for a in alternatives:
        assert a["cells"][1] == probability_text(a["logprob"]) and a["cells"][2] == f"{a['logprob']:.3f}"
    token_id = int(spans[i].get_attribute("data-id"))
    assert [a["actual"] for a in alternatives] == [a["id"] == token_id for a in alternatives]
    for a in alternatives:  # each alternative's text: what it would have added after the tokens before it
        assert a["cells"][0] != "…"
        if a["actual"]:
            assert a["cells"][0] == tooltip_text(spans[i].get_attribute("data-text"))
    shot = Path(os.environ.get("PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # Colour by rank: every token takes its bucket's colour: GLTR's (top 10, 100, 1000, beyond) with exact ranks,
    # else rank 1, 2..k, below k.
    driver.find_element(By.CSS_SELECTOR, "input[name=colour][value=rank]").click()
    green, yellow, red, purple = "rgb(183, 239, 178)", "rgb(255, 242, 168)", "rgb(255, 193, 179)", "rgb(227, 200, 255)"
    exact = server_reports_ranks(server)
    for t in _tokens(driver)[1:]:
        if exact:
            rank = int(t["rank"])
            want = green if rank <= 10 else yellow if rank <= 100 else red if rank <= 1000 else purple
        else:
            want = green if t["rank"] == "1" else red if t["rank"].startswith(">") else yellow
        assert t["background"] == want, t
    driver.find_element(By.CSS_SELECTOR, "input[name=colour][value=logprob]").click()


@pytest.mark.timeout(300)
def test_conversation_mode_scores_the_chat_template_or_says_why_not(browser, server):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(server.url + "/")
    _type(driver, "#api-key", API_KEY + "\t")
    _wait_scored(driver)
    driver.find_element(By.CSS_SELECTOR, "input[name=mode][value=conversation]").click()
    _wait_scored(driver)
    messages = driver.execute_script(
        "return Array.from(document.querySelectorAll('.message')).map(m => ({role: m.querySelector('select').value,"
        " content: m.querySelector('textarea').value}))")
    body = {"messages": [messages], "return_logits": "all", "logits": False, "target_logprobs": True, "top_k": TOP_K}
    r = httpx.post(server.url + "/v1/logits", json=body, headers=server.headers, timeout=60)
    error = driver.find_element(By.ID, "error")
    if r.status_code == 200:
        row = r.json()["data"][0]
        shown = _tokens(driver)
        assert not error.is_displayed()
        assert len(shown) == row["num_tokens"]
        assert [float(t["logprob"]) for t in shown[1:]] == row["target_logprobs"][:-1]
    else:
        # A server without `messages` (or a checkpoint without a chat template): its message, no tokens.
        assert r.status_code in (400, 422), r.text
        assert error.is_displayed() and error.text == r.json()["error"]["message"]
        assert not _tokens(driver)
        assert driver.find_element(By.ID, "perplexity").text == "–"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_model_in_the_playground(browser, start_server):
    """The embedded default model (a real one, so the colours mean something); PLAYGROUND_SCREENSHOT=path keeps the
    screenshot (docs/playground.png is made this way)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from service.default_model import DefaultModelError, ensure_default_model

    try:
        ensure_default_model()  # prepared once (download and conversion), before the server's start is timed
    except DefaultModelError as error:
        pytest.skip(f"the default model could not be prepared: {error}")
    server = start_server(None, ready=False)
    server.wait_ready(timeout=300)
    driver = browser
    driver.get(server.url + "/")
    _wait_scored(driver, timeout=120)
    text = ("The capital of France is Paris. It is known for the Eiffel Tower, which was completed in 1889 for the "
            "World's Fair.\nPhotosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen; "
            "purple elephants negotiate quietly with the refrigerator.")
    check_scored_text(driver, server, text, top_k_check=False)
    spans = driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    assert spans[5].get_attribute("data-text") == " Paris"
    ActionChains(driver).move_to_element(spans[5]).perform()
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.getElementById('tip').dataset.ready"))
    path = os.environ.get("PLAYGROUND_SCREENSHOT")
    if path:
        size = driver.get_window_size()
        driver.set_window_size(1200, 790)  # a viewport of about 650 px: page and tooltip
        assert driver.save_screenshot(path)
        driver.set_window_size(size["width"], size["height"])
