"""`wattproxy serve | keys | usage`: parses flags into Settings; serves until SIGTERM/SIGINT, then drains."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from aiohttp import web

from proxy.config import ConfigError, Settings, load_settings
from proxy.energy.meter import MeterError
from proxy.ledger import Ledger, LedgerUnavailable

T = TypeVar("T")
DB_HELP = "ledger URL: sqlite:///path.db (default in the data dir) or postgresql://..."
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
    serve.add_argument(
        "--cache-dir", help="where built (tiny:) models are cached; hub downloads go to HF_HOME's cache"
    )
    serve.add_argument("--data-dir", help="where the ledger and other data are kept")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument(
        "--event-loop", choices=["auto", "uvloop", "asyncio"], help="default auto: uvloop where installed"
    )
    serve.add_argument(
        "--auth", choices=["keys", "none"], help="API keys (default) or none (local development)"
    )
    serve.add_argument("--metrics-token", help="require this bearer token on GET /metrics")
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="proxy mode: forward to this OpenAI-compatible server (vLLM, TGI) and meter its GPUs",
    )
    serve.add_argument("--upstream-api-key", metavar="KEY", help="API key WattProxy sends to the upstream")
    serve.add_argument(
        "--upstream-devices",
        metavar="0,1",
        type=_device_indices,
        help="CUDA indices of the GPUs the upstream runs on (default 0)",
    )
    serve.add_argument("--db", help=DB_HELP)

    # where the ledger is: accepted before or after a `keys` subcommand (`keys list --data-dir D`)
    ledger_args = argparse.ArgumentParser(add_help=False)
    ledger_args.add_argument("--config", help="TOML settings file (also WATTPROXY_CONFIG)")
    ledger_args.add_argument("--data-dir", help="where the ledger is kept")
    ledger_args.add_argument("--db", help=DB_HELP)
    # the same after the subcommand: absent unless given there (SUPPRESS), so a value given before it
    # stands otherwise
    below = argparse.ArgumentParser(add_help=False)
    for flag in ("--config", "--data-dir", "--db"):
        below.add_argument(flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    keys = sub.add_parser("keys", help="create, list and revoke API keys", parents=[ledger_args])
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once", parents=[below])
    create.add_argument("--user", required=True)
    create.add_argument("--admin", action="store_true", help="may manage keys and read everyone's usage")
    create.add_argument("--budget-kwh", type=float)
    create.add_argument("--budget-co2-grams", type=float)
    create.add_argument("--period", choices=["day", "month", "total"], default="total")
    keys_sub.add_parser("list", help="list keys (never the secrets)", parents=[below])
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id", parents=[below])
    revoke.add_argument("key_id")

    usage = sub.add_parser(
        "usage", help="energy and CO2e per user, model, task or day", parents=[ledger_args]
    )
    usage.add_argument("--user")
    usage.add_argument("--since", help="ISO 8601 date or time, or Unix seconds (inclusive)")
    usage.add_argument("--until", help="ISO 8601 date or time, or Unix seconds (exclusive)")
    usage.add_argument("--by", choices=["model", "task", "day", "user"])
    usage.add_argument("--format", choices=["table", "csv", "json"], default="table")
    return parser


def _device_indices(text: str) -> list[int]:
    """'0,1' -> [0, 1]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected CUDA indices like 0,1, not {text!r}") from e


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    if args.command != "serve":
        return {"data_dir": args.data_dir, "db": args.db}
    carbon = {k: v for k, v in (("zone", args.carbon_zone), ("pue", args.pue)) if v is not None}
    upstream = {
        k: v
        for k, v in (
            ("url", args.upstream),
            ("api_key", args.upstream_api_key),
            ("devices", args.upstream_devices),
        )
        if v is not None
    }
    return {
        "auth": args.auth,
        "db": args.db,
        "metrics_token": args.metrics_token,
        "host": args.host,
        "port": args.port,
        "meter": args.meter,
        "idle_policy": args.idle_policy,
        "cache_dir": args.cache_dir,
        "data_dir": args.data_dir,
        "log_level": args.log_level,
        "event_loop": args.event_loop,
        "carbon": carbon or None,
        "upstream": upstream or None,
    }


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; then new requests get 503 while in-flight ones finish (bounded).
    Returns the exit status: 1 when a configured model failed to load (a bad model setting stops the
    server, after saying why), else 0."""
    from prometheus_client import disable_created_metrics

    from proxy.app import create_app, make_runner
    from proxy.state import SCHEDULER, SERVICE

    # `_created` series double the counters' series and ~45% of render time; Prometheus does not need them.
    disable_created_metrics()

    _check_port_free(settings.host, settings.port)  # before anything is set up (an admin key printed)
    _fit_open_files(settings.max_connections)
    app = create_app(settings, freeze=True)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    for addr in runner.addresses:
        log.info("listening on http://%s:%s", addr[0], addr[1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    failed: list[str] = []
    watch = asyncio.create_task(_watch_model_loading(app[SERVICE], stop, failed))
    await stop.wait()
    watch.cancel()
    service = app[SERVICE]
    service.draining = True
    log.info(
        "draining: new requests get 503; waiting up to %.0f s for in-flight ones", settings.drain_timeout_s
    )
    deadline = loop.time() + settings.drain_timeout_s
    drained = await app[SCHEDULER].drain(settings.drain_timeout_s)
    # what no queue holds (proxy mode's requests, answers being written) within the same bound
    while service.inflight and loop.time() < deadline:
        await asyncio.sleep(0.02)
    if not drained or service.inflight:
        log.warning("drain timed out with work still in flight: it is cut off (charged and recorded)")
    await runner.cleanup()  # handlers still running get SHUTDOWN_GRACE_S more, then are cancelled
    log.info("stopped")
    return 1 if failed else 0


# Open files kept beside the connections: the database, model files, the meter, the event loop's own.
RESERVED_FILES = 256


def _fit_open_files(max_connections: int) -> None:
    """Raise this process's soft limit on open files to hold `max_connections` connections (a socket
    each) and RESERVED_FILES more, up to the hard limit; warn when even that is too low, for then a
    connection past the limit fails at accept() rather than getting the 503 of `max_connections`."""
    import resource

    wanted = max_connections + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open files limited to %d (ulimit -n): fewer than max_connections (%d) + %d; raise the limit "
            "or lower max_connections",
            soft,
            max_connections,
            RESERVED_FILES,
        )


def _check_port_free(host: str, port: int) -> None:
    """OSError (address in use, say) when `host:port` cannot be listened on."""
    if port == 0:
        return
    import errno
    import socket

    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's listener
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:  # a family not enabled (IPv6): skipped, as asyncio does
                    raise


async def _watch_model_loading(service: Any, stop: asyncio.Event, failed: list[str]) -> None:
    """Once every configured model has loaded or failed: any failure stops the server (logged with
    its cause), as a bad setting does, rather than serving on with /readyz at 503 for ever."""
    while True:
        local = [m for m in service.models.values() if not m.upstream]
        if all(m.queue is not None or m.load_error for m in local):
            break
        await asyncio.sleep(0.25)
    failed += [m.settings.name for m in local if m.load_error]
    if failed:
        for m in local:
            if m.load_error:
                log.error(
                    "model %s failed to load (%s): %s; stopping",
                    m.settings.name,
                    m.settings.source,
                    m.load_error,
                )
        stop.set()


def run_event_loop(main: Coroutine[Any, Any, T], choice: str) -> T:
    """Run `main` on uvloop (choice "uvloop", or "auto" where it is installed) or on asyncio's loop."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ValueError("event_loop = 'uvloop' but uvloop is not installed") from None
        else:
            log.info("event loop: uvloop %s", uvloop.__version__)
            return uvloop.run(main)
    log.info("event loop: asyncio")
    return asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(
            args.config, overrides=_overrides(args), ignore=() if args.command == "serve" else ("upstream",)
        )
    except (ConfigError, ValueError) as e:
        sys.stderr.write(f"wattproxy: {e}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if args.command == "serve":
            return run_event_loop(serve(settings), settings.event_loop)
        elif args.command == "keys":
            return asyncio.run(keys_command(settings, args))
        elif args.command == "usage":
            return asyncio.run(usage_command(settings, args))
    except LedgerUnavailable as e:
        log.error("the ledger database is unavailable: %s", e)
        return 1
    except MeterError as e:  # e.g. meter = "nvml" for a model on the CPU
        log.error("the energy meter cannot be used: %s (see the meter setting, --meter)", e)
        return 2
    except ValueError as e:  # configuration found bad at start (e.g. the carbon provider), bad arguments
        log.error("%s", e)
        return 2
    except OSError as e:  # e.g. the port is taken
        log.error("cannot serve: %s", e)
        return 1
    return 0


def _no_ledger(ledger: Ledger) -> bool:
    """True (said on stderr) when the SQLite ledger a reading command would open does not exist: a
    wrong --data-dir must not read as a ledger with nothing in it."""
    path = ledger.missing()
    if path is not None:
        sys.stderr.write(f"wattproxy: no ledger at {path} (check --data-dir / WATTPROXY_DATA_DIR)\n")
    return path is not None


async def keys_command(settings: Settings, args: argparse.Namespace) -> int:
    from proxy.accounts_api import key_json
    from proxy.auth import new_key

    ledger = Ledger(settings.db_url())
    if args.keys_command != "create" and _no_ledger(ledger):
        return 1
    await ledger.start()
    try:
        if args.keys_command == "create":
            secret, record = new_key(
                args.user,
                admin=args.admin,
                budget_kwh=args.budget_kwh,
                budget_co2_grams=args.budget_co2_grams,
                budget_period=args.period,
            )
            await ledger.add_key(record)
            sys.stdout.write(
                f"created {record.key_id} for user {record.user!r}; the key is shown only once:\n"
            )
            sys.stdout.write(f"{secret}\n")
            sys.stderr.write(f"stored in {ledger!r}\n")
        elif args.keys_command == "list":
            for k in await ledger.keys():
                sys.stdout.write(json.dumps(key_json(k)) + "\n")
        elif args.keys_command == "revoke":
            if not await ledger.revoke_key(args.key_id):
                sys.stderr.write(f"wattproxy: no active key {args.key_id!r}\n")
                return 1
            sys.stdout.write(f"revoked {args.key_id}\n")
    finally:
        await ledger.close()
    return 0


async def usage_command(settings: Settings, args: argparse.Namespace) -> int:
    from proxy.usage import (
        as_csv,
        as_json,
        as_table,
        check_range,
        parse_time,
        report_row,
        total_row,
        usage_meta,
    )

    start, end = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    check_range(start, end, ("--since", "--until"))
    ledger = Ledger(settings.db_url())
    if _no_ledger(ledger):
        return 1
    await ledger.start()
    try:
        rows = await ledger.usage(user=args.user, start=start, end=end, group_by=args.by)
    finally:
        await ledger.close()
    report = [report_row(r, settings.phone_charge_kwh) for r in rows]
    total = report_row(total_row(rows), settings.phone_charge_kwh)
    if args.format == "json":
        meta = usage_meta(args.user, start, end, args.by, settings.phone_charge_kwh)
        sys.stdout.write(as_json(report, total, meta) + "\n")
    elif args.format == "csv":
        sys.stdout.write(as_csv(report))
    else:
        sys.stdout.write(as_table(report, total, args.by or "scope") + "\n")
    return 0
