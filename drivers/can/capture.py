"""CAN captures replayed instead of a live bus: what a file is (candump text, or one of
python-can's formats by suffix), told from its content, and its frames in order.

candump text is read here, whatever the file's name (drivers/can/candump.py parses it), so a
capture saved as ``.txt`` or gzipped still replays; the rest goes to python-can's readers.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import can
from can.io.player import MESSAGE_READERS

from drivers.can import candump


class CaptureError(ValueError):
    """A replay file that cannot be read: the message names the file and the accepted forms."""


SNIFF_BYTES = 64 * 1024
SNIFF_FRAMES = 64
ACCEPTED = f"accepted: {candump.FORMS}; or by python-can, by suffix: " + " ".join(
    s for s in sorted(MESSAGE_READERS) if s != ".log")


class Capture(NamedTuple):
    path: Path
    candump: bool
    """candump text (read here, whatever the file's name); else python-can's reader by suffix."""
    clock: str
    """The Timeline mode for its times (drivers/can/candump.py)."""


def open_capture(path: Path) -> Capture:
    """What the file is, from its content: CaptureError when no frame can be read from it."""
    try:
        if not path.exists():
            raise CaptureError(f"{path}: no such file")
        if path.is_dir():
            raise CaptureError(f"{path}: is a directory, not a capture file")
        if not path.is_file():
            raise CaptureError(f"{path}: not a regular file")
        with _open_bytes(path) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as e:  # EOFError, zlib.error: a damaged .gz
        raise CaptureError(f"{path}: cannot read it: {getattr(e, 'strerror', None) or e}") from e
    if not head:
        raise CaptureError(f"{path}: the file is empty")
    text = _text(head)
    lines = re.split(r"\r\n|\r|\n", text)  # universal newlines, as the replay reads them
    lines = lines[:-1] if len(head) == SNIFF_BYTES else lines
    parser = candump.Parser()
    found = [p for p in map(parser.parse, lines) if p is not None][:SNIFF_FRAMES]
    if found:
        return Capture(path, True, candump.clock_of(found))
    suffix = _suffix(path)
    if suffix in MESSAGE_READERS and suffix != ".log":
        _first_frame(path)
        return Capture(path, False, "auto")
    if "\x00" in text:
        raise CaptureError(f"{path}: unknown format (binary, suffix {suffix or 'none'!r}); {ACCEPTED}")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    raise CaptureError(f"{path}: no frame recognised in its first lines (first: {first[:60]!r}); {ACCEPTED}")


def _open_bytes(path: Path) -> Any:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _text(head: bytes) -> str:
    """The head as text: UTF-8, or UTF-16 with its BOM (as Windows tools save it)."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return head.decode("utf-16", errors="replace")
    return head.decode("utf-8", errors="replace").lstrip("\ufeff")


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")


def _reader(path: Path) -> Any:
    kwargs = {"relative_timestamp": False} if _suffix(path) == ".asc" else {}
    return can.LogReader(str(path), **kwargs)


def _first_frame(path: Path) -> None:
    reader = None
    try:
        reader = _reader(path)
        if next(iter(reader), None) is None:
            raise CaptureError(f"{path}: python-can read no frame from it; {ACCEPTED}")
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - python-can's readers raise many types for a bad file
        raise CaptureError(f"{path}: python-can cannot read it ({type(e).__name__}: {e}); {ACCEPTED}") from e
    finally:
        if reader is not None:
            try:
                reader.stop()
            except Exception:  # noqa: BLE001 - closing a half-read file
                pass


def frames(capture: Capture, parser: candump.Parser) -> Iterator[can.Message]:
    """Every frame of the capture, with the times written in it (judged by the Timeline)."""
    if not capture.candump:
        reader = None
        try:
            reader = _reader(capture.path)
            yield from reader
        except Exception as e:  # noqa: BLE001 - a reader failing mid-file: the replay cannot go on
            raise CaptureError(f"{capture.path}: python-can stopped reading it: {type(e).__name__}: {e}") from e
        finally:
            if reader is not None:
                reader.stop()
        return
    with _open_bytes(capture.path) as raw:
        bom = raw.read(2)
        raw.seek(0)
        encoding = "utf-16" if bom in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
        with io.TextIOWrapper(raw, encoding=encoding, errors="replace") as f:
            try:
                for line in f:
                    p = parser.parse(line)
                    if p is not None:
                        yield p.msg
            except (OSError, EOFError, zlib.error) as e:  # the frames before it were replayed
                raise CaptureError(f"{capture.path}: reading stopped: {e}") from e
