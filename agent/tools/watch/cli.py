"""``lorry-agent watch`` on the command line: its options, merged with ``--config``, and :func:`main`."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from agent.tools.watch.client import Options
from agent.tools.watch.loop import SCREEN_INTERVAL_S, watch


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535: {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lorry-agent watch``.

    Connection options default to None in the namespace so that :func:`main` can tell an
    option given on the command line (it wins) from one to take from ``--config`` or the
    built-in default (shown in the help).
    """
    parser.add_argument("--config", "-c", type=Path, metavar="FILE",
                        help="take host, port, prefix, device, TLS and credentials from this agent config "
                             "(e.g. /etc/lorry-agent/agent.toml); options given here win")
    parser.add_argument("--host", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, help="broker port (default 1883)")
    parser.add_argument("--prefix", help='topic prefix (default "lorry")')
    parser.add_argument("--device", help='device id to watch (default: all devices, "+"; with --config: that device)')
    parser.add_argument("--json", action="store_true",
                        help="print every reading received as one JSON object per line (batches flattened, "
                             "in arrival order) and nothing else on stdout")
    parser.add_argument("--tls-ca", type=Path, metavar="FILE",
                        help="CA certificate(s) the broker's must chain to (enables TLS)")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="client key (mutual TLS)")
    parser.add_argument("--username", help="broker user name")
    parser.add_argument("--password-file", type=Path, metavar="FILE", help="file holding the password (its first line)")
    parser.add_argument("--client-id", help="MQTT client id (default: lorry-watch-<random>); never the agent's or "
                                            "the backend's own id, or the broker disconnects one of them")
    parser.add_argument("--keep-session", action="store_true",
                        help="ask the broker to keep this client's session (needs --client-id): what is published "
                             "while watch is not running is delivered next time (default: a clean session)")
    parser.add_argument("--for", dest="duration", type=_positive, metavar="SECONDS",
                        help="exit after this long (default: until Ctrl-C)")
    parser.add_argument("--once", action="store_true", help="exit after the first state screen (for scripts)")
    parser.add_argument("--interval", type=_positive, default=SCREEN_INTERVAL_S, metavar="SECONDS",
                        help=f"seconds between state screens (default {SCREEN_INTERVAL_S:g}); a screen is only "
                             "printed when something changed")


class UsageError(Exception):
    pass


def options(args: argparse.Namespace) -> Options:
    """The command line merged with ``--config``: given options win, then the config, then
    the defaults. Raises :class:`UsageError` with a message for a human."""
    a = vars(args)
    base = Options()
    cfg_values: dict[str, Any] = {}
    if a.get("config") is not None:
        from agent import config as config_mod

        try:
            cfg = config_mod.load(a["config"])
        except config_mod.ConfigError as e:
            raise UsageError(str(e)) from None
        m = cfg.mqtt
        cfg_values = {"host": m.host, "port": m.port, "prefix": m.topic_prefix, "device": cfg.device.id,
                      "protocol": m.protocol, "username": m.username, "password_file": m.password_file}
        if m.tls is not None:
            cfg_values |= {"tls_ca": m.tls.ca_file, "tls_cert": m.tls.cert_file, "tls_key": m.tls.key_file,
                           "tls_insecure_hostname": m.tls.insecure_skip_hostname}
        # Never the agent's client id: the broker would disconnect the agent for us.

    def pick(name: str) -> Any:
        if a.get(name) is not None:
            return a[name]
        if cfg_values.get(name) is not None:
            return cfg_values[name]
        return getattr(base, name, None)

    prefix, device = pick("prefix"), pick("device")
    for what, value, wild in (("--prefix", prefix, False), ("--device", device, True)):
        if not value or "/" in value or "#" in value or ("+" in value and not (wild and value == "+")):
            raise UsageError(f"{what} {value!r}: one topic level, without '/', '#' or '+'"
                             + (' (or "+" for every device)' if wild else ""))
    password = None
    password_file = pick("password_file")
    if password_file is not None:
        try:
            text = Path(password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the password file {password_file}: {e}") from None
        password = text.splitlines()[0] if text else ""
    username = pick("username")
    if password is not None and username is None:
        raise UsageError("--password-file needs --username")
    tls_ca, tls_cert, tls_key = pick("tls_ca"), pick("tls_cert"), pick("tls_key")
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if tls_cert is not None and tls_ca is None:
        raise UsageError("--tls-cert needs --tls-ca")
    for path in (tls_ca, tls_cert, tls_key):
        if path is not None and not os.access(path, os.R_OK):
            raise UsageError(f"cannot read {path}")
    if a.get("keep_session") and not a.get("client_id"):
        raise UsageError("--keep-session needs --client-id (a session belongs to a client id)")
    return Options(host=pick("host"), port=pick("port"), prefix=prefix, device=device,
                   client_id=a.get("client_id"), keep_session=bool(a.get("keep_session")),
                   protocol=pick("protocol"), tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                   tls_insecure_hostname=bool(pick("tls_insecure_hostname")),
                   username=username, password=password)


def main(args: argparse.Namespace) -> int:
    """``lorry-agent watch``: 0 when done (``--for``, ``--once``, Ctrl-C), 1 if it never got
    subscribed, 2 for unusable options."""
    try:
        opts = options(args)
    except UsageError as e:
        print(f"lorry-agent watch: {e}", file=sys.stderr)
        return 2
    try:
        return watch(opts, as_json=bool(getattr(args, "json", False)), duration=getattr(args, "duration", None),
                     once=bool(getattr(args, "once", False)),
                     interval=getattr(args, "interval", None) or SCREEN_INTERVAL_S)
    except (ssl.SSLError, OSError, ValueError) as e:  # e.g. a TLS file paho cannot load
        print(f"lorry-agent watch: cannot set up the connection: {e}", file=sys.stderr)
        return 2
