"""Browser safety and the small things around it (service/guards.py, deps.read_body, routes/docs.py): only JSON
bodies are read, the Host header is checked, CORS only for the origins given, HEAD where GET is, no redirect built
from the Host header, the API document from local assets and behind the key, a mid-body disconnect is a 499."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from service.guards import AllowedHosts, allowed_hosts, host_name
from tests.service.shared_servers import API_KEY, shared_server

GOOD = {"input_ids": [[1, 2, 3, 4]]}


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return shared_server(start_server, tiny_checkpoint)


def _post(server, path, content, content_type, **headers):
    h = dict(server.headers, **headers)
    if content_type is not None:
        h["content-type"] = content_type
    return httpx.post(server.url + path, content=content, headers=h, timeout=30)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx", "text/json"])
def test_a_body_not_declared_as_json_is_415(server, content_type):
    body = b'{"input_ids": [[1, 2, 3, 4]]}'
    for path in ("/v1/logits", "/tokenize", "/v1/completions"):
        r = _post(server, path, body, content_type)
        assert r.status_code == 415, (path, content_type, r.text)
        err = r.json()["error"]
        assert err["type"] == "unsupported_media_type" and "application/json" in err["message"]


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=UTF-8"])
def test_json_with_parameters_is_read(server, content_type):
    r = _post(server, "/v1/logits", b'{"input_ids": [[1, 2, 3, 4]]}', content_type)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80",
                                  "localhost.evil.example"])
def test_a_foreign_host_is_refused(server, host):
    r = httpx.get(server.url + "/info", headers={**server.headers, "host": host})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "host_not_allowed"
    r = _post(server, "/v1/logits", b'{"input_ids": [[1]]}', "application/json", host=host)
    assert r.status_code == 400


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST.", "[::1]", "app.localhost"])
def test_local_hosts_are_answered(server, host):
    r = httpx.get(server.url + "/info", headers={**server.headers, "host": f"{host}:{server.port}"})
    assert r.status_code == 200, r.text


def test_allowed_hosts_parsing():
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM.:80") == "example.com"
    assert allowed_hosts([], "0.0.0.0") == ["*"] and "*" not in allowed_hosts(["a.example"], "0.0.0.0")
    local = AllowedHosts(allowed_hosts([], "127.0.0.1"))
    assert "127.0.0.1" in local and "::1" in local and "0:0:0:0:0:0:0:1" in local and "localhost" in local
    assert "evil.example" not in local and "" not in local
    named = AllowedHosts(["api.example.com", "*.corp.example"])
    assert "api.example.com" in named and "x.corp.example" in named and "corp.example.evil" not in named


def test_allowed_hosts_flag_and_cors_origins(start_server, tiny_checkpoint):
    origin = "http://page.example"
    server = start_server(tiny_checkpoint, "--allowed-hosts", "api.example,*.corp.example", "--cors-origins", origin)
    try:
        assert httpx.get(server.url + "/health", headers={"host": "api.example"}).status_code == 200
        assert httpx.get(server.url + "/health", headers={"host": "a.corp.example:1"}).status_code == 200
        assert httpx.get(server.url + "/health", headers={"host": "127.0.0.1"}).status_code == 200  # always
        assert httpx.get(server.url + "/health", headers={"host": "evil.example"}).status_code == 400
        preflight = {"origin": origin, "access-control-request-method": "POST",
                     "access-control-request-headers": "content-type", "host": "api.example"}
        r = httpx.options(server.url + "/v1/logits", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        r = httpx.options(server.url + "/v1/logits", headers={**preflight, "origin": "http://other.example"})
        assert r.headers.get("access-control-allow-origin") != "http://other.example"
    finally:
        server.stop()


def test_no_cors_by_default(server):
    preflight = {"origin": "http://page.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type"}
    r = httpx.options(server.url + "/v1/logits", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(server.url + "/v1/logits", json=GOOD, headers={**server.headers, "origin": "http://page.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/", "/docs", "/v1/models"])
def test_head_is_answered_where_get_is(server, path):
    get = httpx.get(server.url + path, headers=server.headers)
    head = httpx.head(server.url + path, headers=server.headers)
    assert head.status_code == get.status_code == 200, (head.status_code, get.status_code)
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


def test_no_trailing_slash_redirect(server):
    r = httpx.get(server.url + "/health/", headers={"host": f"localhost:{server.port}"})
    assert r.status_code == 404 and "location" not in r.headers


def test_docs_from_local_assets_and_the_document_behind_the_key(server):
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/static/docs.js"):
        r = httpx.get(server.url + asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    doc = httpx.get(server.url + "/openapi.json", headers=server.headers)
    assert doc.status_code == 200 and "/v1/logits" in doc.json()["paths"]
    assert httpx.get(server.url + "/redoc").status_code == 404


def test_a_mid_body_disconnect_is_a_499_logged_without_traceback(server):
    def count() -> float:
        text = httpx.get(server.url + "/metrics").text
        line = next((x for x in text.splitlines()
                     if x.startswith("logitserve_requests_total{") and 'endpoint="/v1/logits"' in x
                     and 'status="499"' in x), None)
        return float(line.split()[-1]) if line else 0.0

    before = count()
    log_start = len(server.log_path.read_text())
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"POST /v1/logits HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     f"authorization: Bearer {API_KEY}\r\ncontent-length: 1000\r\n\r\n{{\"input_ids\"".encode())
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while count() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count() == before + 1
    time.sleep(0.2)
    log = server.log_path.read_text()[log_start:]
    assert "the client went away (499)" in log
    assert "Traceback" not in log and "ClientDisconnect" not in log


def test_swagger_ui_renders_the_document_offline_with_the_key(server):
    """/docs in a headless Chromium: the operations appear once the key is typed (the document needs it)."""
    from tests.service.test_playground import _browser_paths

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pyproject test extra)")
    paths = _browser_paths()
    if paths is None:
        pytest.skip("no headless Chromium")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/docs")
        driver.execute_script("sessionStorage.setItem('logitserve-api-key', arguments[0])", API_KEY)
        driver.get(server.url + "/docs")
        WebDriverWait(driver, 30, poll_frequency=0.2).until(
            lambda d: d.execute_script("return Array.from(document.querySelectorAll('.opblock-summary-path'))"
                                       ".some(e => e.textContent.includes('/v1/logits'))"))
    finally:
        driver.quit()
