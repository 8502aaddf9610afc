"""A small local server that speaks the Hugging Face Hub's HTTP protocol, for tests of `--model org/name`.

It answers what huggingface_hub (2.x) calls for `snapshot_download`, `model_info` and `hf_hub_download`, with the
Hub's headers and error codes, so that the real download code runs against it through `HF_ENDPOINT`:

- `GET /api/models/{repo}[/revision/{rev}]`: the model info (`sha`, `siblings`, `gated`);
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=`: the file listing (`oid`, `size`, `lfs`);
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: small files answered directly (`ETag` = git blob id, `X-Repo-Commit`);
  LFS files (weights) redirected with 302 to a "CDN" on another host name (`localhost` instead of `127.0.0.1`),
  the redirect carrying `X-Linked-Etag` (sha256) and `X-Linked-Size`, as the Hub does;
- `Range` is not honoured (a resumed download gets the whole file with 200, which huggingface_hub handles);
- errors as the Hub sends them: `X-Error-Code` `RepoNotFound` (401 without a token, 404 with one),
  `RevisionNotFound`, `EntryNotFound` (404), `GatedRepo` (401 without a token, 403 with one that has no access).

Every request is recorded in `LocalHub.requests` so that tests can check what was (not) fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class HubRepo:
    """A model repository: its commits (sha -> {path: bytes}) and refs (branch or tag -> sha)."""

    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False

    def commit(self, files: dict[str, bytes], *refs: str) -> str:
        """Add a commit holding `files` and point `refs` (default: main) at it; returns its sha."""
        digest = hashlib.sha1(self.repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        for ref in refs or ("main",):
            self.refs[ref] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, keyed by its path relative to it."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class LocalHub:
    """The server: `with LocalHub() as hub: hub.add(repo); env HF_ENDPOINT=hub.url`."""

    def __init__(self, tokens: tuple[str, ...] = ()):
        self.repos: dict[str, HubRepo] = {}
        self.tokens = set(tokens)  # tokens that have been granted access to the gated repositories
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, repo: HubRepo) -> HubRepo:
        self.repos[repo.repo_id] = repo
        return repo

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> LocalHub:
        hub = self

        class Handler(_HubHandler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fetched_files(self, since: int = 0) -> set[str]:
        """Repository paths downloaded (GET on resolve) by the requests from index `since` on."""
        out = set()
        for method, path in self.requests[since:]:
            parts = urlsplit(path).path.split("/")
            if method == "GET" and len(parts) > 5 and parts[3] == "resolve":
                out.add("/".join(unquote(p) for p in parts[5:]))
        return out


class _HubHandler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: the tests read LocalHub.requests instead
        pass

    # --------------------------------------------------------------------------------------------- plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        headers = dict(headers or {})
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _token(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _repo(self, repo_id: str) -> HubRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            # The Hub answers 401 to an anonymous request for a repository it does not show (missing or private).
            status = 404 if self._token() else 401
            self._error(status, "RepoNotFound", "Repository not found")
        return repo

    def _repo_at(self, repo_id: str, revision: str) -> tuple[HubRepo, str] | None:
        """The repository and the commit `revision` names; None once the Hub's error is answered."""
        repo = self._repo(repo_id)
        if repo is None:
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, sha

    # ------------------------------------------------------------------------------------------------ routes
    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def _route(self):
        self.hub.requests.append((self.command, self.path))
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        query = parse_qs(url.query)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            rest = parts[4:]
            if not rest:
                return self._model_info(repo_id, "main")
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, unquote(rest[1]))
            if rest[0] == "tree" and len(rest) >= 2:
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._tree(repo_id, unquote(rest[1]), "/".join(unquote(p) for p in rest[2:]), recursive)
        if parts[:1] == ["cdn"] and len(parts) == 2:
            return self._cdn(parts[1])
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
            return self._resolve(repo_id, unquote(parts[3]), "/".join(unquote(p) for p in parts[4:]))
        self._error(404, None, f"no route {url.path}")

    def _model_info(self, repo_id: str, revision: str):
        found = self._repo_at(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        body = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "library_name": "transformers",
            "tags": ["transformers", "safetensors"],
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
        self._send(200, json.dumps(body).encode())

    def _tree(self, repo_id: str, revision: str, folder: str, recursive: bool):
        found = self._repo_at(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        prefix = folder + "/" if folder else ""
        entries, folders = [], set()
        for path, content in sorted(repo.commits[sha].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parent = path.rsplit("/", 1)[0] if "/" in rest else None
                while parent and parent + "/" != prefix and parent.startswith(prefix):
                    folders.add(parent)
                    parent = parent.rsplit("/", 1)[0] if "/" in parent else None
            entry = {"type": "file", "oid": git_blob_id(content), "size": len(content), "path": path}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": git_blob_id(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        self._send(200, json.dumps(entries).encode())

    def _resolve(self, repo_id: str, revision: str, path: str):
        found = self._repo_at(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        commit_header = {"X-Repo-Commit": sha}
        if repo.gated:
            token = self._token()
            if token is None:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                   "to it and be authenticated to access it. Please log in.", commit_header)
            if token not in self.hub.tokens:
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in "
                                   "the authorized list.", commit_header)
        content = repo.commits[sha].get(path)
        if content is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", commit_header)
        if path.endswith(LFS_SUFFIXES):
            digest = hashlib.sha256(content).hexdigest()
            headers = {**commit_header, "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(content)),
                       "ETag": f'"{git_blob_id(content)}"', "Location": f"http://localhost:{self.hub.port}/cdn/{digest}"}
            return self._send(302, b"", headers, content_type="text/plain")
        self._send(200, content, {**commit_header, "ETag": f'"{git_blob_id(content)}"'},
                   content_type="application/octet-stream")

    def _cdn(self, digest: str):
        for repo in self.hub.repos.values():
            for files in repo.commits.values():
                for content in files.values():
                    if hashlib.sha256(content).hexdigest() == digest:
                        return self._send(200, content, {"ETag": f'"{digest}"'}, content_type="binary/octet-stream")
        self._error(404, None, "no such object")
