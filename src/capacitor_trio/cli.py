"""The `capacitor-trio` command: run the daemon, check a configuration, try the filter chain on a
file, verify the audit trail, print the version."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from capacitor_trio import __version__
from capacitor_trio.config import ConfigError, Settings, ensure_data_dir, load_settings
from capacitor_trio.config.load import redacted
from capacitor_trio.store.fsops import UnsafePath, check_private_dir

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capacitor-trio",
        description="A store-and-forward DICOM router (DICOM Capacitor compatible configuration).",
        epilog="Any global key can be overridden with --config.<key>=<value>, e.g. --config.scpPort=11112 "
        "or --config.api.port=8080.",
    )
    p.add_argument("--version", action="version", version=f"capacitor-trio {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the router in the foreground until SIGINT/SIGTERM")
    check = sub.add_parser("check-config", help="validate the configuration and print the effective settings")
    ftest = sub.add_parser(
        "filter-test",
        help="run the configured filter chain on a DICOM file offline and print what it decides",
        description="Runs the filters config.yml names on FILE as the router would for an item for "
        "--dest (and for each destination a route adds), and prints: kept or dropped, added "
        "destinations, files save_file would write (none is written), each attribute changed "
        "(before -> after). Capacitor's `--mutate SRC_AE DST_AE IN OUT` is accepted too.",
    )
    ftest.add_argument("--source", default="", help="the calling AE title the file came from")
    ftest.add_argument("--dest", required=True, help="the destination node's AE title")
    ftest.add_argument("file", type=Path, metavar="FILE.dcm")
    ftest.add_argument("-o", "--output", type=Path, metavar="OUT.dcm", help="write what --dest would get")
    for sp in (run, check, ftest):
        sp.add_argument(
            "--path", type=Path, default=Path("capacitor-data"),
            help="data directory holding config.yml and nodes.yml (default: ./capacitor-data)",
        )
    verify = sub.add_parser(
        "audit-verify",
        help="check the audit trail's HMAC chain (rotated files too); print the first broken line",
    )
    verify.add_argument("--path", type=Path, default=Path("capacitor-data"), help="data directory (holds audit.key)")
    verify.add_argument("--log", type=Path, default=None, metavar="DIR", help="log directory (default: log in the data directory)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument(
        "--log", type=Path, default=None, metavar="DIR",
        help="directory of the log files (default: log in the data directory)",
    )
    return p


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Pull `--config.<key>=<value>` (or `--config.<key> <value>`) out of argv."""
    rest: list[str] = []
    overrides: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError("command line", arg, "", "needs a value: --config.<key>=<value>")
                i += 1
                value = args[i]
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _check_private(settings: Settings) -> None:
    """Refuse a cache directory another user owns or others may write to (`UnsafePath`); warn
    when config.yml holds an API secret and other users may read it."""
    cache = settings.config.cache_path
    if cache.exists():
        check_private_dir(cache)
    api = settings.config.api
    config_yml = settings.config.data_dir / "config.yml"
    with contextlib.suppress(OSError):
        if (api.token or api.service_password) and config_yml.stat().st_mode & 0o044:
            print(
                f"WARNING: {config_yml} holds an API secret and other users may read it "
                f"(chmod 600 {config_yml})",
                file=sys.stderr,
            )


def audit_verify(data_dir: Path, log_dir: Path) -> int:
    """`capacitor-trio audit-verify`: 0 and "ok, N lines", or 1 and the first broken line."""
    from capacitor_trio.audit import verify

    try:
        count, broken = verify(data_dir, log_dir)
    except (OSError, ValueError) as exc:
        print(f"capacitor-trio: audit-verify: {exc}", file=sys.stderr)
        return 1
    if broken is not None:
        print(f"broken at {broken.path}:{broken.line_number} ({broken.reason}), after {count} good line(s):")
        print(broken.line)
        return 1
    print(f"ok, {count} lines")
    return 0


def mutate_alias(argv: Sequence[str]) -> list[str]:
    """Capacitor's `--mutate SRC_AE DST_AE IN OUT` as `filter-test` arguments (the other
    arguments, e.g. --path, kept); other command lines unchanged."""
    args = list(argv)
    if "--mutate" not in args:
        return args
    k = args.index("--mutate")
    if len(args) < k + 5:
        return args  # argparse explains what is missing
    src, dst, source_file, out = args[k + 1 : k + 5]
    rest = args[:k] + args[k + 5 :]
    return ["filter-test", *rest, "--source", src, "--dest", dst, source_file, "-o", out]


def _filter_test(settings: Settings, args: argparse.Namespace) -> int:
    import datetime

    from capacitor_trio.actors.filter_step import chain_of, trial_text, try_chain

    try:
        data = args.file.read_bytes()
        trials = try_chain(
            chain_of(settings.config), data, source_ae=args.source, destination_ae=args.dest,
            root=settings.config.data_dir, now=datetime.datetime.now().astimezone(),
        )
    except (OSError, ValueError) as e:
        print(f"capacitor-trio: filter-test: {e}", file=sys.stderr)
        return 1
    print(trial_text(trials))
    if args.output is not None:
        out = trials[0].output
        if out is None:
            print(f"capacitor-trio: filter-test: {args.dest} gets nothing: {args.output} not written", file=sys.stderr)
            return 0
        args.output.write_bytes(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = mutate_alias(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_overrides(argv)
        args = _parser().parse_args(rest)
        data_dir: Path = args.path.resolve()
        if args.command == "audit-verify":
            return audit_verify(data_dir, args.log.resolve() if args.log is not None else data_dir / "log")
        if args.command == "run" and ensure_data_dir(data_dir):
            print(f"INFO: created a default configuration in {data_dir}", file=sys.stderr)
        settings = load_settings(data_dir, overrides=overrides)
        if args.command == "run":
            _check_private(settings)
    except ConfigError as e:
        print(f"capacitor-trio: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except UnsafePath as e:
        print(f"capacitor-trio: cannot start: {e.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "filter-test":
        return _filter_test(settings, args)
    if args.command == "check-config":
        for w in settings.warnings:
            print(f"WARNING: {w}", file=sys.stderr)
        print(json.dumps(redacted(settings), indent=2))
        print("configuration OK", file=sys.stderr)
        return 0
    from capacitor_trio.runtime import run_daemon

    log_dir = args.log.resolve() if args.log is not None else None
    return run_daemon(settings, log_level=args.log_level, log_dir=log_dir)
