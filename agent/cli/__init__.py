"""The ``lorry-agent`` command line.

Each command imports what it needs only when it is the one that runs: ``run`` and
``check-config`` on a lorry never load the backend tools (``agent.tools``), and ``watch`` or
``verify-chain`` on a backend machine never load the config schema unless asked to. Even the
arguments are declared for the chosen command only (``COMMANDS`` at the end of this module):
the top-level help needs no more than each command's one-line help.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from agent.config import Config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(_command_in(argv)).parse_args(argv)
    rc: int = args.func(args)
    return rc


class Command(NamedTuple):
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    """Declares the command's arguments (importing what that needs)."""
    run: Callable[[argparse.Namespace], int]


def _command_in(argv: list[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the top level has
    no option that takes a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line, with the arguments of ``command`` only (the others' are not needed
    to parse it, nor to show the top-level help)."""
    p = argparse.ArgumentParser(prog="lorry-agent", description="Onboard telematics agent for cross-border lorries.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help)
        if name == command:
            cmd.arguments(sp)
            sp.set_defaults(func=cmd.run)
    return p


def _with_config(sp: argparse.ArgumentParser) -> None:
    from agent.config import DEFAULT_PATH

    sp.add_argument("--config", "-c", type=Path, default=DEFAULT_PATH,
                    help=f"configuration file (default {DEFAULT_PATH})")


def _run_arguments(sp: argparse.ArgumentParser) -> None:
    _with_config(sp)
    sp.add_argument("--dry-run", action="store_true",
                    help="publish nothing: print each message as a JSON line, exit when replays end "
                         "(1 if a source's driver crashed)")
    sp.add_argument("--until-drained", action="store_true",
                    help="exit once every replay has ended (live sources stop with them) and the broker has "
                         "acknowledged everything (1 if a source's driver crashed)")


def _check_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", type=Path, nargs="?", help="file to check (default: --config)")
    _with_config(sp)


def _status_arguments(sp: argparse.ArgumentParser) -> None:
    _with_config(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")


def _verify_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", type=Path,
                    help="received events: JSON lines (readings, batches, or topic/payload lines)")
    sp.add_argument("--key-file", type=Path, help="the device's HMAC key: also check every event's HMAC")
    sp.add_argument("--partial", action="store_true", help="the file starts mid-chain (do not require chain_seq 1)")


def _watch_arguments(sp: argparse.ArgumentParser) -> None:
    from agent.tools.watch.cli import add_arguments

    add_arguments(sp)  # has its own --config: command line beats config beats defaults


def _demo_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--speed", type=float, default=1000.0, help="replay speed (default 1000x real time)")
    sp.add_argument("--workdir", type=Path, help="keep the broker and store here (default: a temp folder)")


def _load(path: Path, *, check_sources: bool = False) -> Config | None:
    """The config, or None after printing every problem; ``check_sources`` also asks each
    configured source's driver (devices, key files) as ``run`` and ``check-config`` do."""
    from agent import config as config_mod
    from agent.config import ConfigError

    try:
        cfg = config_mod.load(path)
        if check_sources and (problems := source_problems(cfg)):
            raise ConfigError(path, problems)
        return cfg
    except ConfigError as e:
        print(f"configuration error in {e.path}:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _cmd_check(args: argparse.Namespace) -> int:
    path = args.file or args.config
    cfg = _load(path, check_sources=True)
    if cfg is None:
        return 1
    print(f"{path}: OK (device {cfg.device.id}, broker {cfg.mqtt.host}:{cfg.mqtt.port}, "
          f"sources: {', '.join(cfg.sources) or 'none'})")
    return 0


def source_problems(cfg: Config) -> list[str]:
    """Everything ``run`` needs that the schema cannot see: each file and device key by its
    role, what is in the files (agent/config/__init__.py `usable_problems`), then what each configured
    source's driver finds wrong with its section, once its files are usable."""
    from agent.config import usable_problems
    from agent.daemon.runner import driver_for

    problems = usable_problems(cfg)
    reported = {p.split(": ", 1)[0] for p in problems}
    for name in cfg.sources:
        kind, _, item = name.partition(":")
        if any(w.startswith(f"[{kind}]") or (item and w.startswith(f"[{kind} #") and f" ({item})]" in w)
               for w in reported):
            continue  # its files are not usable: the driver's own check would only trip on them
        try:
            cls, section = driver_for(cfg, name)
            found = cls.check(section)
        except Exception as e:  # noqa: BLE001 - a check that trips is a problem to show, not a traceback
            found = [f"[{name}]: cannot be checked: {type(e).__name__}: {e}"]
        problems += found
    return problems


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config, check_sources=True)
    if cfg is None:
        return 1
    _setup_logging(cfg.log.level)
    from agent.daemon.runner import run
    from agent.store.lock import StoreLocked

    try:
        return run(cfg, dry_run=args.dry_run, until_drained=args.until_drained)
    except StoreLocked as e:  # another agent writes this store: say who, and stop
        print(f"lorry-agent: {e}", file=sys.stderr)
        return 1


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    from agent.cli.statusview import collect, render
    s = collect(cfg.store.path)
    print(json.dumps(s, indent=2) if args.json else render(s))
    return 0 if "error" not in s else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from agent.model.chain import read_key
    from agent.tools.verify import render, verify_file

    try:
        key = read_key(args.key_file, private=False)  # the backend's copy, on the backend's machine
        reports = verify_file(args.file, key, args.partial)
    except (OSError, ValueError) as e:
        print(f"verify-chain: {e}", file=sys.stderr)
        return 2
    print(render(reports))
    return 0 if reports and all(r.ok for r in reports) else 1


def _cmd_unit(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    from agent.daemon.dropin import dropin

    print(dropin(cfg), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging("error")  # the demo tells its own story on stdout
    from agent.demo.run import run_demo
    return run_demo(speed=args.speed, workdir=args.workdir, out=sys.stdout)


def _cmd_watch(args: argparse.Namespace) -> int:
    from agent.tools.watch.cli import main as watch_main

    return watch_main(args)


def _setup_logging(level: str) -> None:
    from agent.daemon.logs import setup

    setup(level)


COMMANDS: dict[str, Command] = {
    "run": Command("run the agent (the systemd service runs this)", _run_arguments, _cmd_run),
    "check-config": Command("validate a configuration file (exit 0 if usable)", _check_arguments, _cmd_check),
    "status": Command("buffer depth, last fix, last publish, counters", _status_arguments, _cmd_status),
    "verify-chain": Command("prove a file of received seal/alarm events is complete and unaltered",
                            _verify_arguments, _cmd_verify),
    "watch": Command("subscribe as the backend would and show each device's live state", _watch_arguments,
                     _cmd_watch),
    "unit-dropin": Command("print a systemd drop-in allowing only the configured devices", _with_config, _cmd_unit),
    "demo": Command("replay the bundled Chongqing -> Hanoi trip against a private mosquitto", _demo_arguments,
                    _cmd_demo),
}
"""Every command, in the order the help lists them."""


if __name__ == "__main__":
    sys.exit(main())
