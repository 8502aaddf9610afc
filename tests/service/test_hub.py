"""`--model org/name`: the real huggingface_hub download path against a local server that speaks the Hub's HTTP
protocol (tests/service/hub_server.py), through `HF_ENDPOINT`; cache hits offline and with the server gone;
revisions; one-line errors with exit code 2; a request served from a Hub id."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.service.conftest import REPO
from tests.service.hub_server import HubRepo, LocalHub, folder_files
from tests.service.reference import check_logits_response

GRANTED_TOKEN = "hf_granted"
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
# What a real model repository holds beside the serving files: none of it may be downloaded.
NOT_SERVED = {
    "pytorch_model.bin": b"\x80\x02pickled weights",
    "training_args.pt": b"\x80\x02pickled",
    "onnx/model.safetensors": b"not for serving",
    "original/consolidated.safetensors": b"not for serving",
    "original/params.json": b"{}",
    "README.md": b"# a model card\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
}


def serving_files(folder: Path) -> dict[str, bytes]:
    files = folder_files(folder)
    files["tokenizer_config.json"] = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}).encode()
    files["chat_template.jinja"] = CHAT_TEMPLATE.encode()
    # Not the same bytes as chat_template.jinja: the cache keeps one blob per content, fetched once.
    files["additional_chat_templates/tool_use.jinja"] = (CHAT_TEMPLATE + "{# tools #}").encode()
    return files


def sharded(folder: Path, out: Path) -> dict[str, bytes]:
    """The checkpoint split into two shards with an index, plus a consolidated copy that must not be fetched."""
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, out / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    files = {k: v for k, v in serving_files(folder).items() if k != "model.safetensors"}
    for shard in sorted(set(weight_map.values())):
        files[shard] = (out / shard).read_bytes()
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["consolidated.safetensors"] = (folder / "model.safetensors").read_bytes()
    return files


@pytest.fixture(scope="module")
def checkpoints(checkpoint_factory):
    return {"main": checkpoint_factory("llama"), "v1": checkpoint_factory("llama", seed=1)}


@pytest.fixture(scope="module")
def hub(checkpoints, tmp_path_factory):
    with LocalHub(tokens=(GRANTED_TOKEN,)) as hub:
        tiny = hub.add(HubRepo("org/tiny"))
        tiny.commit({**serving_files(checkpoints["v1"]), **NOT_SERVED}, "v1")
        tiny.commit({**serving_files(checkpoints["main"]), **NOT_SERVED}, "main")
        hub.add(HubRepo("org/sharded")).commit(sharded(checkpoints["main"], tmp_path_factory.mktemp("shards")))
        hub.add(HubRepo("org/gated", gated=True)).commit(serving_files(checkpoints["main"]))
        pickled = {k: v for k, v in serving_files(checkpoints["main"]).items() if not k.endswith(".safetensors")}
        hub.add(HubRepo("org/pickled")).commit({**pickled, "pytorch_model.bin": b"\x80\x02pickled weights"})
        yield hub


def hub_env(endpoint: str, hf_home: Path, **extra: str) -> dict:
    """The test process's environment without any Hub or logitserve setting of its own, plus these."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "LOGITSERVE_", "HUGGING_FACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), **extra)
    return env


FETCH = "import sys; from service.hub import fetch_checkpoint; print(fetch_checkpoint(sys.argv[1], sys.argv[2] or None))"


def fetch(env: dict, repo_id: str, revision: str | None = None) -> Path:
    proc = subprocess.run([sys.executable, "-c", FETCH, repo_id, revision or ""], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


PROGRESS_BAR = re.compile(r"^\S.*: +\d+%\|.*\]$")  # a tqdm line such as "Fetching 5 files:   0%|   | 0/5 [...]"


def serve_error(env: dict, *args: str) -> str:
    """`python -m service serve ARGS` must exit 2 with exactly one line on stderr besides the progress bar of a
    download that had started (a gated repository lists its files but refuses them); returns that line."""
    proc = subprocess.run([sys.executable, "-m", "service", "serve", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS_BAR.match(ln)]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def snapshot_files(snapshot: Path) -> dict[str, bytes]:
    return {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}


def test_download_fetches_only_the_serving_files(hub, checkpoints, tmp_path):
    before = len(hub.requests)
    env = hub_env(hub.url, tmp_path / "hf", TQDM_POSITION="-1")  # progress bars even without a terminal
    proc = subprocess.run([sys.executable, "-c", FETCH, "org/tiny", ""], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    snapshot = Path(proc.stdout.strip())
    assert "Fetching" in proc.stderr and "100%" in proc.stderr, "no progress bar"

    # In huggingface_hub's cache layout, at main's commit.
    assert snapshot.parent.parent == tmp_path / "hf" / "hub" / "models--org--tiny"
    assert snapshot.name == hub.repos["org/tiny"].refs["main"]
    assert (snapshot.parent.parent / "refs" / "main").read_text() == snapshot.name
    want = serving_files(checkpoints["main"])
    assert snapshot_files(snapshot) == want
    # Small files straight from resolve; weights from the "CDN" the resolve redirect named.
    assert hub.fetched_files(since=before) == set(want) - {"model.safetensors"}
    cdn = [path for method, path in hub.requests[before:] if method == "GET" and path.startswith("/cdn/")]
    assert len(cdn) == 1


def test_sharded_checkpoint_fetches_the_index_and_its_shards(hub, tmp_path):
    snapshot = fetch(hub_env(hub.url, tmp_path / "hf"), "org/sharded")
    assert sorted(p.name for p in snapshot.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (snapshot / "model.safetensors.index.json").is_file()
    assert not (snapshot / "consolidated.safetensors").exists()

    from model.families.weights import CheckpointReader  # the loader reads exactly what was fetched

    with CheckpointReader(snapshot) as reader:
        index = json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"]
        assert all(name in reader and reader.read(name).numel() > 0 for name in index)


def test_cached_snapshot_starts_offline_and_without_the_hub(checkpoints, tmp_path):
    hf_home = tmp_path / "hf"
    with LocalHub() as hub:
        hub.add(HubRepo("org/tiny")).commit(serving_files(checkpoints["main"]))
        online = fetch(hub_env(hub.url, hf_home), "org/tiny")

        before = len(hub.requests)
        assert fetch(hub_env(hub.url, hf_home, HF_HUB_OFFLINE="1"), "org/tiny") == online
        assert hub.requests[before:] == [], "offline mode asked the Hub"
        endpoint = hub.url
    # The server is gone: connection refused, so huggingface_hub falls back to the cached snapshot.
    assert fetch(hub_env(endpoint, hf_home), "org/tiny") == online
    assert snapshot_files(online) == serving_files(checkpoints["main"])


def test_revision_picks_a_tag_or_a_commit(hub, checkpoints, tmp_path):
    env = hub_env(hub.url, tmp_path / "hf")
    v1 = hub.repos["org/tiny"].refs["v1"]
    tagged = fetch(env, "org/tiny", "v1")
    assert tagged.name == v1
    assert (tagged / "model.safetensors").read_bytes() == (checkpoints["v1"] / "model.safetensors").read_bytes()
    assert fetch(env, "org/tiny", v1) == tagged
    main = fetch(env, "org/tiny")
    assert main.name != v1
    assert (main / "model.safetensors").read_bytes() == (checkpoints["main"] / "model.safetensors").read_bytes()


def test_gated_repository_with_a_granted_token(hub, tmp_path):
    snapshot = fetch(hub_env(hub.url, tmp_path / "hf", HF_TOKEN=GRANTED_TOKEN), "org/gated")
    assert (snapshot / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["missing repo", "missing revision", "gated without token", "gated, token refused",
                                  "no safetensors", "offline, not cached", "hub unreachable, not cached"])
def test_unservable_hub_model_exits_2_with_one_line(hub, tmp_path, case):
    env = hub_env(hub.url, tmp_path / "hf")
    args = {
        "missing repo": ["--model", "org/nothing-here"],
        "missing revision": ["--model", "org/tiny", "--revision", "v9"],
        "gated without token": ["--model", "org/gated"],
        "gated, token refused": ["--model", "org/gated"],
        "no safetensors": ["--model", "org/pickled"],
        "offline, not cached": ["--model", "org/tiny"],
        "hub unreachable, not cached": ["--model", "org/tiny"],
    }[case]
    if case == "gated, token refused":
        env["HF_TOKEN"] = "hf_not_granted"
    if case == "offline, not cached":
        env["HF_HUB_OFFLINE"] = "1"
    if case == "hub unreachable, not cached":
        from tests.service.conftest import free_port

        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    line = serve_error(env, *args)
    assert line.startswith("logitserve: --model org/"), line
    expected = {
        "missing repo": "no repository org/nothing-here on the Hub",
        "missing revision": "no revision 'v9'",
        "gated without token": "gated repository: accept its conditions on the Hub, then set HF_TOKEN",
        "gated, token refused": "the token in use has no access",
        "no safetensors": "no safetensors weights",
        "offline, not cached": "HF_HUB_OFFLINE is set",
        "hub unreachable, not cached": "cannot be reached",
    }[case]
    assert expected in line, line


def test_an_existing_local_path_wins_over_a_hub_id(checkpoints, tmp_path, monkeypatch):
    from service.cli import resolve_model
    from service.hub import hub_id

    local = tmp_path / "org" / "tiny"
    local.mkdir(parents=True)
    for name, content in folder_files(checkpoints["main"]).items():
        (local / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/tiny") is None
    assert resolve_model("org/tiny") == "org/tiny"  # no Hub is configured: a look-up would fail
    assert hub_id("org/elsewhere") == "org/elsewhere"
    for not_an_id in ("./org/x", "/abs/x", "x", "org/x.gguf", "a/b/c", "org/..", "org--x/y"):
        assert hub_id(not_an_id) is None, not_an_id


@pytest.mark.slow
def test_a_request_served_from_a_hub_id(hub, start_server, reference_runner, tmp_path):
    server = start_server("org/tiny", env=hub_env(hub.url, tmp_path / "hf"))
    with server.client() as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "org/tiny"
        info = c.get("/info").json()
        assert Path(info["model_path"]).name == hub.repos["org/tiny"].refs["main"]
        seqs = [[1, 17, 42, 99, 5, 250, 7], [1, 3, 4]]
        body = {"input_ids": seqs, "return_logits": "all", "logits": False, "target_logprobs": True, "top_k": 3}
        r = c.post("/v1/logits", json=body)
        assert r.status_code == 200, r.text
        check_logits_response(reference_runner, body, seqs, r.json())
