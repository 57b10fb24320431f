"""`wattproxy serve`: parses flags into Settings and runs the service until SIGTERM/SIGINT, then drains."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from proxy.config import ConfigError, Settings, load_settings

log = logging.getLogger("wattproxy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wattproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the configured models over the OpenAI-compatible API")
    serve.add_argument("--config", help="TOML settings file (also WATTPROXY_CONFIG)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080; 0 picks a free one)")
    serve.add_argument("--meter", choices=["auto", "nvml", "estimated", "synthetic"], help="energy meter")
    serve.add_argument("--idle-policy", choices=["separate", "amortize"], help="what to do with idle energy")
    serve.add_argument("--carbon-zone", help="carbon-intensity zone (ISO country code or WORLD)")
    serve.add_argument("--pue", type=float, help="data-centre power usage effectiveness (>= 1.0)")
    serve.add_argument("--cache-dir", help="where built and downloaded models are cached")
    serve.add_argument("--data-dir", help="where the ledger and other data are kept")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    carbon = {k: v for k, v in (("zone", args.carbon_zone), ("pue", args.pue)) if v is not None}
    return {
        "host": args.host,
        "port": args.port,
        "meter": args.meter,
        "idle_policy": args.idle_policy,
        "cache_dir": args.cache_dir,
        "data_dir": args.data_dir,
        "log_level": args.log_level,
        "carbon": carbon or None,
    }


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; then new requests get 503 while in-flight ones finish (bounded)."""
    from proxy.app import SCHEDULER, create_app
    from proxy.state import SERVICE

    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    for addr in runner.addresses:
        log.info("listening on http://%s:%s", addr[0], addr[1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    service = app[SERVICE]
    service.draining = True
    log.info(
        "draining: new requests get 503; waiting up to %.0f s for in-flight ones", settings.drain_timeout_s
    )
    drained = await app[SCHEDULER].drain(settings.drain_timeout_s)
    deadline = loop.time() + 5.0
    while service.inflight and loop.time() < deadline:
        await asyncio.sleep(0.02)
    if not drained:
        log.warning("drain timed out with work still in flight")
    await runner.cleanup()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
    except (ConfigError, ValueError) as e:
        print(f"wattproxy: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "serve":
        try:
            asyncio.run(serve(settings))
        except ValueError as e:  # configuration found bad at start (e.g. the carbon provider)
            log.error("%s", e)
            return 2
    return 0
