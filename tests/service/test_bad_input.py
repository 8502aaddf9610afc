"""Bad input battery and security checks.

Each bad request gets its documented 4xx (docs/api.md, Errors) with a message that names the problem, and a correct
request right after it succeeds. Then the security properties: API keys compared in constant time and never
logged, no pickle on data from outside the service's processes, localhost by default, non-checkpoint model paths
refused, the container's non-root user.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service.shared_servers import API_KEY, shared_server

REPO = Path(__file__).resolve().parents[2]
GOOD = {"input_ids": [[1, 2, 3, 4]], "return_logits": "all", "target_logprobs": True}


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return shared_server(start_server, tiny_checkpoint)


@pytest.fixture(scope="module")
def vocab(server):
    return server.info()["config"]["vocab_size"]


def _post(server, path, *, content=None, json=None, headers=None, timeout=60):
    h = dict(server.headers)
    h.update(headers or {})
    return httpx.post(server.url + path, content=content, json=json, headers=h, timeout=timeout)


def _refused(r: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"type", "message", "param"}
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err)
    if param is not None:
        assert err["param"] == param, err
    return err


def _still_serves(server):
    r = _post(server, "/v1/logits", json=GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["num_tokens"] == 4


def _cases(vocab: int) -> list[tuple[str, str, dict, int, tuple, str | None]]:
    """(name, path, request kwargs, status, words the message names, param)."""
    j = "application/json"
    return [
        ("invalid JSON", "/v1/logits", {"content": b'{"input_ids": [[1, 2}', "headers": {"content-type": j}},
         422, ("not valid JSON",), None),
        ("not an object", "/v1/logits", {"json": [[1, 2, 3]]}, 422, ("JSON object",), None),
        ("empty body", "/v1/logits", {"content": b"", "headers": {"content-type": j}}, 422, ("not valid JSON",),
         None),
        ("wrong type: ids as strings", "/v1/logits", {"json": {"input_ids": [["1", "2"]]}}, 422,
         ("input_ids[0][0]", "sequence 0"), "input_ids"),
        ("wrong type: bool for int", "/v1/logits", {"json": {"input_ids": [[True, 2]]}}, 422, ("input_ids",),
         "input_ids"),
        ("wrong type: float id", "/v1/logits", {"json": {"input_ids": [[1.5, 2]]}}, 422, ("input_ids",), "input_ids"),
        ("wrong type: top_k string", "/v1/logits", {"json": {**GOOD, "top_k": "3"}}, 422, ("top_k",), "top_k"),
        ("wrong type: logits number", "/v1/logits", {"json": {**GOOD, "logits": 1}}, 422, ("logits",), "logits"),
        ("empty list of sequences", "/v1/logits", {"json": {"input_ids": []}}, 422, ("no sequence",), "input_ids"),
        ("empty sequence", "/v1/logits", {"json": {"input_ids": [[1, 2], []]}}, 422, ("sequence 1", "empty"),
         "input_ids"),
        ("empty string list", "/v1/logits", {"json": {"inputs": []}}, 422, ("no sequence",), "inputs"),
        ("empty string", "/v1/embeddings", {"json": {"input": "", "add_special_tokens": False}}, 422, ("sequence 0",), "input"),
        ("neither input", "/v1/logits", {"json": {"return_logits": "all"}}, 422, ("exactly one",), "input_ids"),
        ("both inputs", "/v1/logits", {"json": {"input_ids": [[1]], "inputs": "a"}}, 422, ("exactly one",),
         "input_ids"),
        ("negative id", "/v1/logits", {"json": {"input_ids": [[1, 2], [3, -1]]}}, 422,
         ("sequence 1", "-1", "position 1"), "input_ids"),
        ("id = vocab", "/v1/logits", {"json": {"input_ids": [[vocab]]}}, 422, ("sequence 0", str(vocab)), "input_ids"),
        ("id 2**70", "/v1/logits", {"json": {"input_ids": [[1, 2**70]]}}, 422, ("input_ids[0][1]", "sequence 0", "integer"),
         "input_ids"),
        ("id 2**70 in completions", "/v1/completions", {"json": {"prompt": [[1, 2**70]]}}, 422, ("prompt",), "prompt"),
        ("detokenize negative", "/detokenize", {"json": {"tokens": [1, -5]}}, 422, ("-5", "position 1"), "tokens"),
        ("100k-token sequence", "/v1/logits", {"json": {"input_ids": [[1] * 100_000]}}, 422,
         ("100000 tokens", "max-seq-len", "sequence 0"), "input_ids"),
        ("100k-token string", "/v1/logits", {"json": {"inputs": ["ok", "a b " * 50_000]}}, 422,
         ("sequence 1", "max-seq-len"), "inputs"),
        ("NaN in numeric field", "/v1/logits", {"content": b'{"input_ids": [[1]], "top_k": NaN}',
                                                "headers": {"content-type": j}}, 422,
         ("not valid JSON",), None),
        ("huge number in numeric field", "/v1/logits", {"json": {**GOOD, "top_k": 10**30}}, 422, ("top_k",), "top_k"),
        ("huge float in numeric field", "/v1/logits", {"content": b'{"input_ids": [[1]], "return_n_logits": 1e400}',
                                                       "headers": {"content-type": j}},
         422, ("not valid JSON", "infinity"), None),
        ("huge float temperature", "/v1/completions", {"content": b'{"prompt": [1, 2], "temperature": 1e999}',
                                                         "headers": {"content-type": j}},
         422, ("not valid JSON", "infinity"), None),
        ("negative return_n_logits", "/v1/logits", {"json": {**GOOD, "return_n_logits": -3}}, 422,
         ("return_n_logits",), "return_n_logits"),
        ("unknown field", "/v1/logits", {"json": {**GOOD, "return_logit": "all"}}, 422, ("return_logit",),
         "return_logit"),
        ("unknown field hidden", "/v1/hidden_states", {"json": {"input_ids": [[1]], "layer": [1]}}, 422, ("layer",),
         "layer"),
        ("layer out of range", "/v1/hidden_states", {"json": {"input_ids": [[1]], "layers": [99]}}, 422, ("99",),
         "layers"),
        ("unknown enum", "/v1/logits", {"json": {**GOOD, "return_logits": "some"}}, 422, ("return_logits",),
         "return_logits"),
        ("form content type", "/v1/logits", {"content": b"input_ids=1&top_k=2",
                                             "headers": {"content-type": "application/x-www-form-urlencoded"}},
         415, ("application/json",), "content-type"),
        ("multipart content type", "/v1/logits", {"files": {"f": ("a.json", b'{"input_ids": [[1]]}')}}, 415,
         ("application/json",), "content-type"),
        ("no content type", "/v1/logits", {"content": b'{"input_ids": [[1]]}'}, 415, ("application/json",),
         "content-type"),
        ("unsupported option", "/v1/completions", {"json": {"prompt": [1, 2], "max_tokens": 5}}, 400, ("max_tokens",),
         "max_tokens"),
        ("top_k over vocab not reachable", "/v1/logits", {"json": {**GOOD, "top_k": 101}}, 422, ("top_k",), "top_k"),
    ]


CASE_NAMES = [c[0] for c in _cases(300)]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gets_its_4xx_then_a_good_request_succeeds(server, vocab, name):
    _, path, kw, status, words, param = next(c for c in _cases(vocab) if c[0] == name)
    if "files" in kw:
        r = httpx.post(server.url + path, files=kw["files"], headers=server.headers, timeout=60)
    else:
        r = _post(server, path, **kw)
    _refused(r, status, *words, param=param)
    _still_serves(server)


def test_a_json_body_declared_as_text_is_415(server):
    """Only application/json is read as JSON: a web page may post text/plain anywhere without a CORS preflight
    (curl -d sends x-www-form-urlencoded: add -H 'content-type: application/json')."""
    r = _post(server, "/v1/logits", content=b'{"input_ids": [[1, 2, 3, 4]]}', headers={"content-type": "text/plain"})
    _refused(r, 415, "application/json", param="content-type")


def test_ten_thousand_tiny_sequences_in_one_request(server):
    body = {"input_ids": [[i % 200 + 1] for i in range(10_000)], "logits": False, "target_logprobs": True}
    r = _post(server, "/v1/logits", json=body, timeout=240)
    assert r.status_code == 200, r.text[:300]
    data = r.json()["data"]
    assert len(data) == 10_000 and data[-1]["index"] == 9999 and data[-1]["target_logprobs"] == [None]
    _still_serves(server)


def test_oversized_bodies_413(server):
    limit = server.info()["limits"]["max_request_bytes"]
    big = b'{"input_ids": [[' + b"1, " * (limit // 3 + 10) + b'1]]}'
    json_type = {"content-type": "application/json"}
    err = _refused(_post(server, "/v1/logits", content=big, headers=json_type), 413, str(limit))
    assert err["type"] == "payload_too_large"

    def chunks():  # no content-length: the limit is enforced while reading
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    _refused(_post(server, "/v1/logits", content=chunks(), headers=json_type), 413, str(limit))
    _refused(_post(server, "/tokenize", content=big, headers=json_type), 413, str(limit))
    _still_serves(server)


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer",
                                  f"bearer{API_KEY}", "Bearer " + "x" * 10_000, "Bearer \u00e9t\u00e9"])
def test_bad_api_keys_401(server, auth):
    headers = {} if auth is None else {"authorization": auth.encode("utf-8")}
    for path in ("/v1/logits", "/v1/completions", "/tokenize"):
        r = httpx.post(server.url + path, json=GOOD, headers=headers, timeout=30)
        err = _refused(r, 401, "API key")
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/info", headers=headers).status_code == 401
    _still_serves(server)


def test_non_finite_logprobs_never_break_json(server):
    r = _post(server, "/v1/logits", json={"input_ids": [[1]], "return_logits": "all", "target_logprobs": True})
    assert r.status_code == 200 and r.json()["data"][0]["target_logprobs"] == [None]
    assert not any(isinstance(x, float) and math.isnan(x) for x in r.json()["data"][0]["target_logprobs"])


# --------------------------------------------------------------------------------------------------- security


def test_api_key_compared_in_constant_time():
    src = (REPO / "service" / "deps.py").read_text()
    check = src[src.index("def require_api_key") : src.index("def require_workers")]
    assert "hmac.compare_digest(" in check
    assert not re.search(r"(token|key)\s*(==|!=)", check), check


def test_api_key_never_logged(start_server, tiny_checkpoint):
    key = "sk-secret-never-logged-4242"
    server = start_server(tiny_checkpoint, api_key=key, env={"LOGITSERVE_LOG_LEVEL": "debug"})
    with server.client() as c:
        assert c.post("/v1/logits", json=GOOD).status_code == 200
    httpx.post(server.url + "/v1/logits", json=GOOD, headers={"authorization": f"Bearer {key}-wrong"})
    httpx.post(server.url + "/v1/logits", content=b"{bad json", headers={"authorization": f"Bearer {key}",
                                                                       "content-type": "application/json"})
    info = server.info()
    assert key not in str(info)
    server.stop()
    log = server.log_path.read_text()
    assert "Uvicorn running" in log or "Application startup complete" in log
    assert key not in log


# Modules that may use pickle, and why: the front end sends each batch to its own spawned worker processes
# through a multiprocessing pipe (internal IPC, both ends are this service), and launch_local runs functions
# in processes it spawns itself. Nothing that comes from outside (request bodies, weights, responses) is unpickled.
PICKLE_ALLOWLIST = {"service/workers/supervisor.py", "model/distributed.py"}


def test_no_pickle_on_external_data():
    users = set()
    for path in sorted((REPO / "service").rglob("*.py")) + sorted((REPO / "model").rglob("*.py")):
        src = path.read_text()
        rel = str(path.relative_to(REPO))
        if re.search(r"^\s*(import pickle|from pickle|import cloudpickle|import dill)", src, re.M) or \
                re.search(r"torch\.load\(|np\.load\(|numpy\.load\(|joblib", src):
            users.add(rel)
        assert "torch.load(" not in src and "allow_pickle=True" not in src, rel
    assert users <= PICKLE_ALLOWLIST, users - PICKLE_ALLOWLIST
    # In the allowed modules, what is unpickled only comes from the service's own processes' pipes.
    for path in sorted((REPO / "service" / "workers").glob("*.py")):
        workers = path.read_text()
        assert "pickle.loads" not in workers and "pickle.load(" not in workers, path


def test_default_bind_is_localhost():
    from service.settings import Settings

    assert Settings().host == "127.0.0.1"
    api = (REPO / "docs" / "api.md").read_text() if (REPO / "docs" / "api.md").exists() else ""
    assert "--host 127.0.0.1" in api or not api


@pytest.mark.parametrize("model", ["/etc", "/etc/passwd", "/nonexistent/checkpoint"])
def test_model_path_that_is_not_a_checkpoint_is_refused(model):
    r = subprocess.run([sys.executable, "-m", "service", "serve", "--model", model, "--port", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--model {model}" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_checkpoint_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    r = subprocess.run([sys.executable, "-m", "service", "serve", "--model", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "safetensors" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_container_runs_as_non_root():
    users = re.findall(r"^USER\s+(\S+)", (REPO / "Dockerfile").read_text(), re.M)
    targets = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (REPO / "Dockerfile").read_text(), re.M)
    assert users and len(users) >= len(targets), (users, targets)
    for u in users:
        assert u.split(":")[0] not in ("root", "0"), u


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--tp", "0"], {}, "--tp '0'"),
    (["--dtype", "float8"], {}, "--dtype 'float8'"),
    (["--port", "http"], {}, "--port 'http'"),
    ([], {"LOGITSERVE_MAX_BATCH_TOKENS": "many"}, "LOGITSERVE_MAX_BATCH_TOKENS='many'"),
])
def test_bad_setting_is_one_line_naming_it(args, env, named):
    r = subprocess.run([sys.executable, "-m", "service", "serve", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**{k: v for k, v in os.environ.items() if not k.startswith("LOGITSERVE_")},
                                        **env})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("logitserve: ") and named in lines[0], r.stderr[-2000:]
    assert "validation error" not in r.stderr and "pydantic" not in r.stderr


def test_help_shows_every_flag_with_its_default_and_variable():
    from service.settings import Settings

    r = subprocess.run([sys.executable, "-m", "service", "serve", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "COLUMNS": "1000"})
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for name, field in Settings.flags().items():
        default = "" if field.default in (None, []) else f" (default: {field.default})"
        assert f"--{name.replace('_', '-')} " in text, name
        assert f"{field.description}{default} [env LOGITSERVE_{name.upper()}]" in text, name


def test_server_logs_when_its_workers_are_ready(start_server, tiny_checkpoint):
    """`Uvicorn running` comes before the model is loaded; this line says when requests are answered."""
    server = shared_server(start_server, tiny_checkpoint)
    assert "all 1 replica(s) ready: accepting requests" in server.log()


@pytest.mark.parametrize(("architecture", "args", "named"), [
    ("Gemma3ForConditionalGeneration", [], "Gemma3ForCausalLM"),  # a refused variant names what is supported
    ("LlamaForCausalLM", ["--reranker", "qwen3"], "--reranker qwen3"),  # no <|im_start|> in this tokenizer
])
def test_checkpoint_this_server_cannot_serve_is_one_line(tmp_path, architecture, args, named):
    import json

    from tests.checkpoints import make_checkpoint

    folder = make_checkpoint(tmp_path / "ckpt", num_layers=1)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = [architecture]
    (folder / "config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "service", "serve", "--model", str(folder), "--port", "0", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("logitserve: ")]
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
