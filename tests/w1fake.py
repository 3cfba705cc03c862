"""A DS18B20's sysfs files as the kernel's w1_therm shows them, and a driver reading them."""

from __future__ import annotations

import shutil
from pathlib import Path

from drivers.temperature.config import Ds18b20Config
from drivers.temperature.ds18b20 import Ds18b20
from support import Collector

SENSOR = "28-0316a2795dff"


def w1_slave(milli_c: int | str, crc_ok: bool = True, scratchpad: str = "72 01 4b 46 7f ff 0e 10 57") -> str:
    """What w1_therm shows in /sys/bus/w1/devices/28-*/w1_slave."""
    crc = scratchpad.split()[-1]
    return f"{scratchpad} : crc={crc} {'YES' if crc_ok else 'NO'}\n{scratchpad} t={milli_c}\n"


def sensor(root: Path, files: dict[str, str | bytes]) -> Path:
    """The sensor's directory with these files, appearing at once as sysfs's does (a driver
    running meanwhile must not see it half-written)."""
    device, staging = root / SENSOR, root / ".staging"
    staging.mkdir(parents=True)
    for name, content in files.items():
        (staging / name).write_bytes(content.encode() if isinstance(content, str) else content)
    shutil.rmtree(device, ignore_errors=True)
    staging.rename(device)
    return device


def ds18b20(root: Path, got: Collector, interval_s: float = 60) -> Ds18b20:
    config = Ds18b20Config(name="reefer", driver="ds18b20", sensor_id=SENSOR, w1_root=root, interval_s=interval_s)
    return Ds18b20(config, got)
