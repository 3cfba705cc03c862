"""Keys that name files and devices, checked by their role (agent/model/settings.py `Role`)
before `run` starts, so that a technician hears of a missing certificate or a folder that is
a file from ``check-config``, not from a thread that died at 3 a.m.

Relative paths in the file are relative to the file's folder (`resolve_paths`).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel

from agent.config.schema import Config
from agent.model.settings import Role


def _role(field: Any) -> Role | None:
    """The key's role, given on the key (``Annotated[Path | None, Role(...)]``) or on the
    type of an optional key (``Annotated[str, Role(...)] | None``)."""
    found = [m for m in field.metadata if isinstance(m, Role)]
    for arg in get_args(field.annotation):
        if get_origin(arg) is Annotated:
            found += [m for m in get_args(arg)[1:] if isinstance(m, Role)]
    return found[0] if found else None


def role_keys(model: BaseModel, labels: tuple[str, ...] = ()) -> list[tuple[str, Role, Any]]:
    """Every key with a role, as (where, role, value), where is ``[mqtt.tls] ca_file`` or
    ``[seals #2 (rear_door)] port``; the value is None when the key is not set."""
    out: list[tuple[str, Role, Any]] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if (role := _role(field)) is not None:
            out.append((f"[{'.'.join(labels)}] {name}" if labels else name, role, value))
        elif isinstance(value, BaseModel):
            out += role_keys(value, (*labels, name))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    item_name = getattr(item, "name", None)
                    label = f"{name} #{i + 1}" + (f" ({item_name})" if isinstance(item_name, str) else "")
                    out += role_keys(item, (*labels, label))
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    out += role_keys(item, (*labels, f"{name}.{key}"))
    return out


def resolve_paths(cfg: Config, base: Path) -> Config:
    """Every relative path a key gives (any key with a file role) is relative to ``base``."""

    def absolute(value: Any) -> Any:
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, Path) and not value.is_absolute() and str(value) != ":memory:":
            return base / value
        return value

    def rebase(model: BaseModel) -> BaseModel:
        updates: dict[str, Any] = {}
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if _role(field) is not None:
                new = absolute(value)
            elif isinstance(value, BaseModel):
                new = rebase(value)
            elif isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
                new = [rebase(v) if isinstance(v, BaseModel) else v for v in value]
            else:
                continue
            if new != value:
                updates[name] = new
        return model.model_copy(update=updates) if updates else model

    return rebase(cfg)  # type: ignore[return-value]


def path_problems(cfg: Config) -> list[str]:
    """Every key that names a file or a device, checked by its role: one line per problem,
    ``[section] key: problem; what is allowed``."""
    problems = []
    for where, role, value in role_keys(cfg):
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue
            try:
                problem = _ROLE_CHECKS[role.role](item, role)
            except Exception as e:  # noqa: BLE001 - a path the OS chokes on is a problem to show
                problem = f"cannot use {item}: {reason(e)}"
            if problem is not None:
                problems.append(f"{where}: {problem}")
    return problems


def usable_problems(cfg: Config) -> list[str]:
    """What ``run`` would trip over later, checked now: every file and device key by its role,
    then what is in the files (certificates, keys, the password). ``check-config`` and ``run``
    ask this (with each source driver's own ``check``)."""
    problems = path_problems(cfg)
    bad = {p.split(": ", 1)[0] for p in problems}
    problems += _content_problems(cfg, bad)
    return problems


def reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _stat(p: Path) -> os.stat_result | None:
    """The file's status (following links), None if there is nothing at ``p``."""
    try:
        return p.stat()
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a file where a folder should be
        return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def _check_input(p: Path, role: Role) -> str | None:
    allowed = f"must be a readable file ({role.what})"
    try:
        st = _stat(p)
        if st is None:
            return f"{p}: no such file; {allowed}"
        if not stat.S_ISREG(st.st_mode):
            return f"{p} is {_kind(st.st_mode)}; {allowed}"
        with open(p, "rb"):
            pass
    except (OSError, ValueError) as e:
        return f"cannot read {p}: {reason(e)}; {allowed}"
    if role.role == "secret":
        from agent.model.secrets import secret_problem

        return secret_problem(p)
    return None


def _check_store(p: Path, role: Role) -> str | None:
    if str(p) == ":memory:":
        return None
    try:
        st = _stat(p)
        if st is not None and not stat.S_ISREG(st.st_mode):
            hint = f", e.g. {p / 'buffer.db'}" if stat.S_ISDIR(st.st_mode) else ""
            return f"{p} is {_kind(st.st_mode)}; must be the database file itself{hint}"
        for side in (p.with_name(p.name + s) for s in ("-wal", "-shm", ".ledger", ".lock")):
            if (sst := _stat(side)) is not None and not stat.S_ISREG(sst.st_mode):
                return f"{side} (kept beside the store) is {_kind(sst.st_mode)}; move it away"
        if st is not None and not os.access(p, os.R_OK | os.W_OK):
            return f"cannot write {p}: permission denied; the store must be writable by the agent's user"
        return _check_folder(p.parent)
    except (OSError, ValueError) as e:
        return f"cannot use {p}: {reason(e)}"


def _check_folder(folder: Path) -> str | None:
    """A folder that exists or can be created, and that this user can write in: proven by
    making (and removing) an empty folder in it, or in the nearest folder that exists."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"the folder {folder} cannot be created: {existing} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lorry-agent-check-", dir=existing))
    except OSError as e:
        if existing == folder:
            return f"cannot write in the folder {folder}: {reason(e)}; it must be writable by the agent's user"
        return f"the folder {folder} cannot be created in {existing}: {reason(e)}"
    return None


def _serial_schemes() -> list[str]:
    import pkgutil

    import serial.urlhandler

    return sorted(m.name.removeprefix("protocol_") for m in pkgutil.iter_modules(serial.urlhandler.__path__)
                  if m.name.startswith("protocol_"))


def _check_device(value: str, role: Role) -> str | None:
    """A device that may be absent (plugged in later); one that exists must be a device."""
    if role.role == "serial" and "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in (known := _serial_schemes()):
            return f"unknown pyserial URL scheme {scheme!r}; known: {', '.join(known)} (or a device path)"
        return None
    if role.role == "gpiochip" and "/" not in value:
        return None  # a chip's label, looked up when the line is opened
    if any(c in value for c in "*?["):
        return None  # a glob: whichever matching device is plugged in
    p = Path(value)
    try:
        st = _stat(p)
    except (OSError, ValueError) as e:
        return f"cannot use {value}: {reason(e)}"
    if st is None or stat.S_ISCHR(st.st_mode):
        return None
    return f"{value} is {_kind(st.st_mode)}, not {role.what} (a missing device is fine: it may be plugged in later)"


def _check_device_folder(p: Path, role: Role) -> str | None:
    try:
        st = _stat(p)
    except (OSError, ValueError) as e:
        return f"cannot use {p}: {reason(e)}"
    if st is None or stat.S_ISDIR(st.st_mode):
        return None
    return f"{p} is {_kind(st.st_mode)}; must be {role.what} (absent is fine until the driver is loaded)"


_ROLE_CHECKS: dict[str, Any] = {
    "input": _check_input,
    "secret": _check_input,
    "store": _check_store,
    "serial": _check_device,
    "gpiochip": _check_device,
    "device_folder": _check_device_folder,
}


def _content_problems(cfg: Config, bad: set[str]) -> list[str]:
    """What is inside the files, where the agent would only find out when it uses them."""
    import ssl

    from agent.model.chain import read_key
    from agent.model.secrets import read_secret

    problems = []
    tls = cfg.mqtt.tls
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if "[mqtt.tls] ca_file" not in bad:
            try:
                context.load_verify_locations(cafile=str(tls.ca_file))
            except (ssl.SSLError, OSError, ValueError) as e:
                problems.append(f"[mqtt.tls] ca_file: {tls.ca_file} holds no usable CA certificate "
                                f"(PEM expected): {reason(e)}")
        if tls.cert_file and tls.key_file and not bad & {"[mqtt.tls] cert_file", "[mqtt.tls] key_file"}:
            try:  # an encrypted key cannot be used unattended: no passphrase is ever given
                context.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=lambda: b"")
            except (ssl.SSLError, OSError, ValueError) as e:
                problems.append(f"[mqtt.tls] cert_file: {tls.cert_file} with key_file {tls.key_file} is not a "
                                f"certificate and its unencrypted key (PEM): {reason(e)}")
    password = cfg.mqtt.password_file
    if password is not None and "[mqtt] password_file" not in bad:
        try:
            read_secret(password).decode("utf-8")
        except (OSError, ValueError) as e:
            problems.append(f"[mqtt] password_file: {password} must be UTF-8 text "
                            f"(the password on its first line): {e}")
    keys = (("[chain] hmac_key_file", cfg.chain.hmac_key_file), ("[commands] key_file", cfg.commands.key_file))
    for where, path in keys:
        if path is not None and where not in bad:
            try:
                read_key(path)
            except (OSError, ValueError) as e:
                problems.append(f"{where}: {e}")
    return problems
