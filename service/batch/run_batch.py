"""`logitserve run-batch`: an OpenAI Batch file (vLLM's `run_batch` format) answered by the in-process server.

Input, one JSON object a line: `{"custom_id", "method": "POST", "url": "/v1/...", "body": {...}}`. Output, one line
per input line, in input order: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`,
where `body` is the server's JSON answer byte for byte (spliced in, never re-encoded). A line that cannot be read
gets `response: null` and an `error`; a request the server refuses gets its non-200 response; the run goes on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import orjson

from .inprocess import InProcessServer

# Requests in flight at once: enough for the batcher to fill batches from several of them.
DEFAULT_CONCURRENCY = 16


@dataclass
class BatchRequest:
    """One input line, read: either a request to send or the reason it cannot be sent."""

    line: int  # 1-based line number in the input
    custom_id: str | None
    url: str | None = None
    body: bytes | None = None
    error: str | None = None


@dataclass
class BatchSummary:
    lines: int = 0  # answered in this run
    skipped: int = 0  # already in the output (--resume)
    failed: int = 0  # answered with an error entry or a non-200 response
    tokens: int = 0  # prompt tokens of the answered requests
    seconds: float = 0.0


def parse_line(number: int, text: bytes) -> BatchRequest:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return BatchRequest(number, None, error=f"line {number} is not JSON: {exc}")
    if not isinstance(obj, dict):
        return BatchRequest(number, None, error=f"line {number} is not a JSON object")
    custom_id = obj.get("custom_id")
    custom_id = custom_id if isinstance(custom_id, str) else None
    problems = []
    if custom_id is None:
        problems.append("custom_id (a string) is missing")
    if obj.get("method", "POST") != "POST":
        problems.append(f"method {obj.get('method')!r} is not POST")
    url = obj.get("url")
    if not isinstance(url, str) or not url.startswith("/"):
        problems.append("url (a path such as /v1/logits) is missing")
    if not isinstance(obj.get("body"), dict):
        problems.append("body (a JSON object) is missing")
    if problems:
        return BatchRequest(number, custom_id, error=f"line {number}: " + "; ".join(problems))
    return BatchRequest(number, custom_id, url, orjson.dumps(obj["body"]))


def _entry_id(line: int) -> str:
    """The output line's id; it carries the input line number, so that --resume can tell lines without a
    custom_id apart."""
    return f"batch-{line}-{uuid.uuid4().hex}"


def error_entry(req: BatchRequest) -> bytes:
    return orjson.dumps({"id": _entry_id(req.line), "custom_id": req.custom_id, "response": None,
                         "error": {"code": "invalid_request", "message": req.error}}) + b"\n"


def response_entry(req: BatchRequest, status_code: int, body: bytes) -> bytes:
    head = orjson.dumps({"id": _entry_id(req.line), "custom_id": req.custom_id})[:-1]
    response = orjson.dumps({"status_code": status_code, "request_id": f"batch-req-{uuid.uuid4().hex}"})[:-1]
    return head + b',"response":' + response + b',"body":' + body + b'},"error":null}\n'


def answered(output: Path) -> tuple[set[str], set[int]]:
    """custom_ids and line numbers (of lines without a custom_id) already in `output`; a last line cut short by a
    crash is removed."""
    ids: set[str] = set()
    lines: set[int] = set()
    if not output.exists():
        return ids, lines
    data = output.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete != len(data):
        with open(output, "r+b") as f:
            f.truncate(complete)
    for text in data[:complete].splitlines():
        entry = orjson.loads(text)
        if entry.get("custom_id") is not None:
            ids.add(entry["custom_id"])
        else:
            lines.add(int(entry["id"].split("-")[1]))
    return ids, lines


def _usage_tokens(body: bytes) -> int:
    try:
        usage = orjson.loads(body).get("usage") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return int(usage.get("prompt_tokens", 0) or 0) if isinstance(usage, dict) else 0


async def run_batch(server: InProcessServer, input_path: str | Path, output_path: str | Path, *,
                    resume: bool = False, concurrency: int = DEFAULT_CONCURRENCY,
                    progress: bool = True) -> BatchSummary:
    """Answer every line of `input_path` into `output_path` (appended to with `resume`, else overwritten)."""
    from tqdm.auto import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    done_ids, done_lines = answered(output_path) if resume else (set(), set())
    total = sum(1 for text in input_path.open("rb") if text.strip())
    summary = BatchSummary()
    start = time.perf_counter()
    bar = tqdm(total=total, unit="line", desc="run-batch", disable=not progress)

    async def answer(req: BatchRequest) -> tuple[bytes, int, bool]:
        if req.error is not None:
            return error_entry(req), 0, False
        result = await server.post(req.url, req.body)
        ok = result.status_code == 200
        return response_entry(req, result.status_code, result.content), _usage_tokens(result.content) if ok else 0, ok

    pending: deque[asyncio.Task] = deque()
    with output_path.open("ab" if resume else "wb") as out:

        def write(entry: bytes, tokens: int, ok: bool) -> None:
            out.write(entry)
            summary.lines += 1
            summary.failed += not ok
            summary.tokens += tokens
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(tokens=summary.tokens, tok_s=f"{summary.tokens / max(elapsed, 1e-9):.0f}", refresh=False)

        number = 0
        with input_path.open("rb") as lines:
            for text in lines:
                if not text.strip():
                    continue
                number += 1
                req = parse_line(number, text)
                if req.custom_id in done_ids or (req.custom_id is None and number in done_lines):
                    summary.skipped += 1
                    bar.update(1)
                    continue
                pending.append(asyncio.ensure_future(answer(req)))
                # Written in input order: the oldest request is waited for once the window is full.
                while pending and (len(pending) >= concurrency or pending[0].done()):
                    write(*await pending.popleft())
        while pending:
            write(*await pending.popleft())
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary
