"""`logitserve serve` and `logitserve convert-gguf`. Flags override `LOGITSERVE_*` environment variables."""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import sys
from pathlib import Path
from typing import get_args

logger = logging.getLogger("logitserve")

def _metavar(name: str, field) -> str:
    extra = field.json_schema_extra or {}
    if extra.get("metavar"):
        return extra["metavar"]
    choices = get_args(field.annotation)
    return "|".join(map(str, choices)) if choices else name.upper()


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "LOGITSERVE_" + name.upper()


def build_parser() -> argparse.ArgumentParser:
    """`serve`'s flags come from Settings: names, help text and defaults are declared once, there. Values are
    taken as text and validated by Settings, so a bad value of a flag or of its variable reads the same."""
    from service.settings import Settings

    parser = argparse.ArgumentParser(prog="logitserve", description="Serve logits, log-probabilities and hidden states.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    for name, field in Settings.flags().items():
        default = "" if field.default in (None, []) else f" (default: {field.default})"
        serve.add_argument(_option(name), dest=name, default=None, metavar=_metavar(name, field),
                           help=f"{field.description}{default} [env {_env(name)}]")
    convert = sub.add_parser("convert-gguf", help="convert a .gguf file into a checkpoint folder")
    convert.add_argument("file")
    convert.add_argument("outdir")
    return parser


def settings_from(overrides: dict[str, str]):
    """Settings from the flags given (over LOGITSERVE_* variables); a bad value raises InvalidSettings with one
    line that names the flag or variable, its value and what is wrong."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            name = str(err["loc"][0]) if err["loc"] else ""
            given = f"{_option(name)} {err['input']!r}" if name in overrides else f"{_env(name)}={err['input']!r}"
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{given}: {message}" if name else message)
        raise InvalidSettings("; ".join(problems)) from None


class InvalidSettings(ValueError):
    pass


def resolve_model(model: str | None, revision: str | None = None) -> str:
    """A checkpoint folder for --model: the default model when absent, a converted folder for a .gguf file, the
    Hub cache's snapshot for a Hub id (an existing local path wins)."""
    if not model:
        from service.default_model import ensure_default_model

        return str(ensure_default_model())
    from service.hub import fetch_checkpoint, hub_id

    if (repo_id := hub_id(model)) is not None:
        return str(fetch_checkpoint(repo_id, revision))
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from service.default_model import cache_root, convert_gguf

        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        out = cache_root() / "gguf" / f"{path.stem}-{key}"
        if not (out / "config.json").is_file():
            convert_gguf(path, out)
        return str(out)
    check_checkpoint(path)
    return str(path)


class NotACheckpoint(ValueError):
    pass


def check_checkpoint(path: Path) -> None:
    """Refuse a --model that is not a checkpoint folder (config.json and safetensors weights) or a .gguf file."""
    if not path.exists():
        raise NotACheckpoint(f"--model {path}: no such file or folder")
    if path.is_file():
        raise NotACheckpoint(f"--model {path}: a file that is not a .gguf; give a checkpoint folder or a .gguf file")
    if not (path / "config.json").is_file():
        raise NotACheckpoint(f"--model {path}: not a checkpoint folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise NotACheckpoint(f"--model {path}: not a checkpoint folder (no *.safetensors weights; pickled .bin "
                             "weights are never loaded)")


# How long shutdown waits for accepted connections to send their request (see serve's Server.shutdown).
ACCEPTED_REQUEST_GRACE_S = 1.0


def serve(settings) -> int:
    import uvicorn

    from service.app import create_app

    settings = settings.model_copy(update={"model": resolve_model(settings.model)})
    from model.families.config import UnsupportedModelError
    from service.rerankers import RerankerSetupError

    try:
        app = create_app(settings)
    except (UnsupportedModelError, RerankerSetupError) as exc:  # a checkpoint this server cannot serve: one line
        print(f"logitserve: {exc}", file=sys.stderr)
        return 2
    engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: refuse new work, finish what is in flight
            engine.begin_drain()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                # A drained SIGTERM is a clean exit (0), not a re-raised signal.
                captured = getattr(self, "_captured_signals", None)
                if captured and sig in captured:
                    captured.remove(sig)

        async def shutdown(self, sockets=None):
            # uvicorn closes every connection that has not delivered a request yet, so a client whose connection
            # was accepted just before the signal sees a disconnect without a response. Stop accepting first, give
            # those connections a moment to deliver their request (answered 503 "draining"), then shut down.
            import asyncio
            import time

            for listener in self.servers:
                listener.close()
            deadline = time.monotonic() + ACCEPTED_REQUEST_GRACE_S
            while time.monotonic() < deadline and any(
                getattr(conn, "cycle", True) is None for conn in self.server_state.connections
            ):
                await asyncio.sleep(0.01)
            await super().shutdown(sockets)

    from service.http_limits import uvicorn_http_options

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=None, access_log=False, **uvicorn_http_options(settings))
    Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "convert-gguf":
        from service.default_model import convert_gguf

        out = convert_gguf(args.file, args.outdir)
        print(out)
        return 0
    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    try:
        from service.hub import HubError, hub_id

        settings = settings_from(overrides)
        settings = settings.model_copy(update={
            "model": resolve_model(settings.model, settings.revision),
            "served_model_name": settings.served_model_name or hub_id(settings.model),
        })
    except (InvalidSettings, NotACheckpoint, HubError) as exc:
        print(f"logitserve: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
