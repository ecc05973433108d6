"""hierarchy serve PIPELINE: the pipeline as an HTTP service with an upload page (docs/serving.md)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import threading
from pathlib import Path

from hierarchy.commands import add_inference_options, positive_int
from hierarchy.commands._explain import add_explain_options
from hierarchy.core.errors import ConfigError, HierarchyError

API_KEY_ENV = "HIERARCHY_API_KEY"
log = logging.getLogger("hierarchy.serve")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a pipeline over HTTP, with an upload page",
                       description="POST /v1/classify (multipart image files -> the records of `hierarchy run "
                       "--format json`, ?explain=true adds class-activation maps), GET / (upload page), /health, "
                       "/ready, /v1/pipeline, /metrics (Prometheus), /docs (OpenAPI). Needs the serve extra. "
                       "SIGTERM or Ctrl-C finishes the requests in flight, then exits.")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB", help="per file (default 20)")
    p.add_argument("--max-files", type=positive_int, default=16, metavar="N", help="per request (default 16)")
    p.add_argument("--max-queue", type=positive_int, default=32, metavar="N",
                   help="classify requests admitted at once; more get 503 + Retry-After (default 32)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per request, else 504 (default 60)")
    p.add_argument("--api-key-file", metavar="FILE", help=f"require this key (X-API-Key or Authorization: Bearer) "
                   f"on /v1/* and /metrics; or set {API_KEY_ENV}. Use one whenever --host is not loopback")
    add_inference_options(p)
    add_explain_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from hierarchy.serve.app import create_app
        from hierarchy.serve.limits import Limits
        from hierarchy.serve.service import ServeOptions, Service
    except ImportError as exc:
        raise HierarchyError(f"hierarchy serve needs the serve extra ({exc.name} is missing): "
                             "pip install 'hierarchy-cascade[serve]'") from None
    from hierarchy.explain.cam import parse_layers

    try:
        limits = Limits(max_upload_mb=args.max_upload_mb, max_files=args.max_files, max_queue=args.max_queue,
                        timeout_s=args.timeout)
    except ValueError as exc:
        raise ConfigError("command line", [str(exc).replace("max_upload_mb", "--max-upload-mb")
                                           .replace("timeout_s", "--timeout")]) from None
    options = ServeOptions(args.device, args.precision, args.engine, args.batch_size, args.workers,
                           args.explain_method, parse_layers(args.explain_layer))
    service = Service(args.pipeline, options, limits)
    key = read_api_key(args.api_key_file)
    if key is None and not is_loopback(args.host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it "
                    "(--api-key-file or %s)", args.host, API_KEY_ENV)
    app = create_app(service, api_key=key, load_on_startup=False)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                                           timeout_graceful_shutdown=int(limits.timeout_s) + 5))
    threading.Thread(target=_load, args=(service, server), name="hierarchy-load", daemon=True).start()
    server.run()
    if service.error:
        print(f"error: {service.error}", file=sys.stderr)
        return 1
    return 0


def _load(service, server) -> None:  # noqa: ANN001 - Service, uvicorn.Server (both imported late)
    try:
        service.load()
    except Exception:  # noqa: BLE001 - logged and kept by the service; the server stops
        server.should_exit = True


def read_api_key(path: str | None) -> str | None:
    """The key from ``--api-key-file`` (first line, stripped), else the environment, else None."""
    if path is None:
        return os.environ.get(API_KEY_ENV) or None
    try:
        key = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("command line", [f"--api-key-file: cannot read {path}: {exc}"]) from None
    if not key or not key[0].strip():
        raise ConfigError("command line", [f"--api-key-file: {path} is empty"])
    return key[0].strip()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
