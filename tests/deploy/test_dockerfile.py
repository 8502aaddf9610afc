"""The Dockerfile: parsed with Docker's own parser (the `dockerfile` package) when installed, and linted with
hadolint when installed; install steps go through scripts/install.sh, the same script the README documents."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest


@pytest.fixture(scope="module")
def text(root):
    return (root / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def stages(text):
    """{target name: [(instruction, argument text)]}, with line continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.search(r"\bAS\s+(\S+)", rest, re.I)
            current = m.group(1) if m else f"stage{len(out)}"
            out[current] = [("FROM", rest)]
        elif current is not None:
            out[current].append((instr, rest))
    return out


def test_targets(stages):
    assert {"cuda", "cpu"} <= set(stages)
    assert "pytorch/pytorch" in stages["cuda"][0][1] or "CUDA_BASE_IMAGE" in stages["cuda"][0][1]
    assert "CPU_BASE_IMAGE" in stages["cpu"][0][1] or "python:3.11-slim" in stages["cpu"][0][1]


@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_stage(stages, text, target):
    steps = stages[target]
    runs = [arg for instr, arg in steps if instr == "RUN"]
    install = [r for r in runs if "scripts/install.sh" in r]
    assert len(install) == 1, "installation goes through scripts/install.sh, once"
    if target == "cuda":
        assert "TORCH_SPEC=skip" in install[0], "the CUDA image keeps the torch of its base image"
    assert not any(re.search(r"\bpip3?\b.*\binstall\b", r) for r in runs), "no pip lines besides install.sh"
    # The default model is prepared at build time into the cache the server reads.
    bake = [r for r in runs if "ensure_default_model" in r]
    assert len(bake) == 1 and "/opt/logitserve/cache" in bake[0]
    env = " ".join(arg for instr, arg in steps if instr == "ENV")
    assert "LOGITSERVE_CACHE=/opt/logitserve/cache" in env
    # ... and before switching to the non-root user.
    instrs = [instr for instr, _ in steps]
    user_at = instrs.index("USER")
    assert instrs.index("RUN") < user_at and all(i != "RUN" for i in instrs[user_at:])
    user = dict(steps)["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert dict(steps)["EXPOSE"] == "8000"
    health = dict(steps)["HEALTHCHECK"]
    assert "/ready" in health and "urllib" in health and "curl" not in health
    assert dict(steps)["ENTRYPOINT"] == '["logitserve"]'
    assert dict(steps)["CMD"] == '["serve", "--host", "0.0.0.0", "--port", "8000"]'


def test_official_parser(root):
    dockerfile = pytest.importorskip("dockerfile")
    cmds = dockerfile.parse_file(str(root / "Dockerfile"))
    froms = [c.value for c in cmds if c.cmd == "FROM"]
    assert [v[-1] for v in froms] == ["cuda", "cpu"]
    runs = [c.value[0] for c in cmds if c.cmd == "RUN"]
    assert sum("scripts/install.sh" in r for r in runs) == 2
    healthchecks = [c for c in cmds if c.cmd == "HEALTHCHECK"]
    assert len(healthchecks) == 2 and all(c.json for c in healthchecks if c.sub_cmd == "CMD")


def test_hadolint(root):
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed")
    proc = subprocess.run([exe, "--failure-threshold", "warning", str(root / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_context_small(root):
    ignored = {line.strip() for line in (root / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git"} <= ignored
    assert any("__pycache__" in p for p in ignored)
    # What scripts/install.sh needs must stay in the context.
    for needed in ("pyproject.toml", "README.md", "model", "service", "scripts"):
        assert needed not in ignored


def test_install_script_is_the_documented_one(root):
    install = (root / "scripts/install.sh").read_text()
    assert "TORCH_SPEC" in install and "pip install" in install
    readme = root / "README.md"
    assert readme.is_file(), "README.md is missing"
    assert re.search(r"scripts/(install|serve)\.sh", readme.read_text()), \
        "the README must document scripts/install.sh (or scripts/serve.sh), the script the Dockerfile runs"
