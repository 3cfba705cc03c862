"""Shared fixtures: a real mosquitto per test, a backend subscriber, configs, agent processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agent.demo.broker import Mosquitto, mosquitto_binary  # noqa: E402
from support import Backend  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LORRY_SHARED_DATA", REPO.parent / "shared" / "data"))
GPSD_CAPTURES = SHARED_DATA / "nmea" / "gpsd"


@pytest.fixture
def gpsd_captures() -> Path:
    if not GPSD_CAPTURES.is_dir():
        pytest.skip(f"real GPS captures not found at {GPSD_CAPTURES} (set LORRY_SHARED_DATA)")
    return GPSD_CAPTURES


@pytest.fixture
def broker(tmp_path: Path):
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run .ci/setup (apt-get install -y mosquitto)")
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def backend(broker: Mosquitto):
    be = Backend(broker.port)
    yield be
    be.close()
