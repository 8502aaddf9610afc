"""`--model org/name`: a checkpoint from the Hugging Face Hub, fetched with huggingface_hub into its usual cache.

Only the files serving reads are fetched: the configuration, the tokenizer and chat-template files (with
transformers' named templates in `additional_chat_templates/`), and the safetensors weights the loader
(`model.weights`) will open: the shards named by `model.safetensors.index.json` when there is one, else every
`*.safetensors` at the top of the repository. Pickled weights (`*.bin`, `*.pt`),
other sub-folders (ONNX exports, original checkpoints) and duplicate consolidated files are never downloaded.

huggingface_hub reads `HF_TOKEN`, `HF_HOME` (or `HF_HUB_CACHE`), `HF_HUB_OFFLINE` and `HF_ENDPOINT` itself, shows
its progress bars on a terminal, and serves a cached snapshot without the network when the Hub cannot be reached
or offline mode is set. Every failure a user can fix (missing repository, revision or weights, a gated
repository without access, no network and no cache) becomes a `HubError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

logger = logging.getLogger("logitserve.hub")

# Small files that serving reads besides the weights (config, tokenizer, chat templates, generation defaults).
# Exact names match at the top of the repository only; the one folder is transformers' named chat templates.
METADATA_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
    "model.safetensors.index.json",
]
INDEX_FILE = "model.safetensors.index.json"
# fnmatch's `*` crosses "/": without this, "*.safetensors" would also fetch sub-folders' weights (ONNX exports,
# original checkpoints).
WEIGHTS_IN_SUBFOLDERS = ["*/*.safetensors"]

# A Hub id as huggingface_hub validates it (`namespace/name`, word characters, "-" and "."), namespace required.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


class HubError(RuntimeError):
    """A `--model` Hub id that cannot be served; the message is one line, for the command line."""


def hub_id(model: str | None) -> str | None:
    """`model` when it names a Hub repository: an id `org/name` that is not an existing local path (which wins)."""
    if not model or not _HUB_ID.match(model) or ".." in model or "--" in model or model.endswith(".gguf"):
        return None
    return None if Path(model).expanduser().exists() else model


def fetch_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of `repo_id` at `revision` (default branch when None) in the Hub cache, holding the
    files that serving needs; downloaded where missing. Raises HubError with a one-line message."""
    from huggingface_hub import constants

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        with _quiet_http_logs():
            snapshot = _fetch(repo_id, revision)
    except HubError:
        raise
    except Exception as exc:  # huggingface_hub's and the network's errors: translated, never a traceback
        raise HubError(_explain(exc, repo_id, revision)) from exc
    if not (snapshot / "config.json").is_file():
        raise HubError(f"--model {where}: the repository has no config.json, so it is not a transformers checkpoint")
    if not any(snapshot.glob("*.safetensors")):
        raise HubError(f"--model {where}: the repository has no safetensors weights (pickled *.bin/*.pt weights are "
                       "never loaded; convert them, or pick a revision with *.safetensors)")
    logger.info("--model %s: commit %s in %s", where, snapshot.name, snapshot.parent.parent)
    if constants.HF_HUB_OFFLINE:
        logger.info("HF_HUB_OFFLINE is set: served from the cache without asking the Hub")
    return snapshot


def _fetch(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    # First the small files (this resolves the revision to a commit and lists the repository once), then exactly
    # the weight files the loader will open, at that commit (no second resolution, and served from the cache
    # without the network when it is complete).
    snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=METADATA_FILES))
    commit = snapshot.name
    index = snapshot / INDEX_FILE
    if index.is_file():
        try:
            weights = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise HubError(f"--model {repo_id}: {INDEX_FILE} at commit {commit} is not a safetensors index "
                           "(no weight_map)") from None
    else:
        weights = ["*.safetensors"]
    return Path(snapshot_download(repo_id, revision=commit, allow_patterns=METADATA_FILES + weights,
                                  ignore_patterns=WEIGHTS_IN_SUBFOLDERS))


@contextlib.contextmanager
def _quiet_http_logs():
    """huggingface_hub's HTTP client logs every request at INFO, which the CLI's logging would print: a line per
    file and HEAD. The progress bars tell the same; keep those loggers to warnings while fetching."""
    loggers = [logging.getLogger(name) for name in ("httpx", "httpx2")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _explain(exc: Exception, repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    endpoint = constants.ENDPOINT
    if isinstance(exc, GatedRepoError):
        if get_token() is None:
            return (f"--model {where} is a gated repository: accept its conditions on the Hub, then set HF_TOKEN to "
                    "a token of that account")
        return (f"--model {where} is a gated repository and the token in use has no access to it: accept its "
                "conditions on the Hub with the token's account")
    if isinstance(exc, RepositoryNotFoundError):
        private = "" if get_token() else " (a private repository needs HF_TOKEN)"
        return f"--model {where}: no such local folder, and no repository {repo_id} on the Hub at {endpoint}{private}"
    if isinstance(exc, RevisionNotFoundError):
        return f"--model {repo_id}: the repository has no revision {revision!r} (a branch, tag or commit)"
    if isinstance(exc, LocalEntryNotFoundError):
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            return f"--model {where}: HF_HUB_OFFLINE is set and the Hub cache ({cache}) does not hold it"
        return f"--model {where}: the Hub at {endpoint} cannot be reached and the cache ({cache}) does not hold it"
    response = getattr(exc, "response", None)
    if isinstance(exc, HfHubHTTPError) and response is not None:
        reason = response.headers.get("X-Error-Message") or getattr(response, "reason_phrase", "")
        return f"--model {where}: the Hub at {endpoint} answered {response.status_code} ({reason})"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"--model {where}: {type(exc).__name__}: {first_line}"
