"""The tamper-evident chain: canonical JSON, linking in the store, verification."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.model.chain import Chain, canonical, genesis
from agent.model.reading import Reading
from agent.store.buffer import Store
from agent.tools.verify import verify

REPO = Path(__file__).resolve().parents[3]
KEY = b"0123456789abcdef-device-key"


@pytest.mark.parametrize(("value", "text"), [
    # RFC 8785 appendix B / ECMAScript number serialisation
    (0.0, "0"), (-0.0, "0"), (5.0, "5"), (1e-7, "1e-7"), (1e-6, "0.000001"), (1e21, "1e+21"),
    (1e20, "100000000000000000000"), (333333333.3333333, "333333333.3333333"),
    (1.7976931348623157e308, "1.7976931348623157e+308"), (5e-324, "5e-324"), (-1.5, "-1.5"),
    (22.1234567, "22.1234567"), (2**53 + 2, "9007199254740994"),
])
def test_numbers_are_canonical(value: float, text: str) -> None:
    assert canonical(value) == text


def test_objects_are_canonical() -> None:
    assert canonical({"b": [1, "é\n", None, True], "a": {"z": 1.0, "\u20ac": 2, "$": 3}}) == \
        '{"a":{"$":3,"z":1,"\u20ac":2},"b":[1,"é\\n",null,true]}'


def chained_store(tmp_path: Path, key: bytes | None = KEY) -> Store:
    s = Store(tmp_path / "b.db", device="CQ-HN-0042", sync_interval_s=0.05, chain=Chain("CQ-HN-0042", key))
    s.start()
    return s


def seal(i: int, event: str = "opened") -> Reading:
    return Reading("seal", 1_790_000_000_000 + i * 1000, {"seal": "rear_door", "event": event, "n": i}, urgent=True)


def received(s: Store) -> list[dict]:
    return [json.loads(r.body) for stream in ("seal", "alarm") for r in s.fetch(stream, 0, 1000)]


def test_seal_and_alarm_events_are_chained_in_commit_order(tmp_path: Path) -> None:
    s = chained_store(tmp_path)
    try:
        s.append(seal(1))
        s.append(Reading("alarm", 1_790_000_001_500, {"kind": "seal_opened", "severity": 1.0}, urgent=True))
        s.append(Reading("position", 1_790_000_002_000, {"lat": 1.0}))
        s.append(seal(2, "sealed"))
        s.flush()
        events = sorted(received(s), key=lambda e: e["chain_seq"])
        assert [e["chain_seq"] for e in events] == [1, 2, 3]
        assert [e["stream"] for e in events] == ["seal", "alarm", "seal"]
        assert events[0]["prev_hash"] == genesis("CQ-HN-0042")
        assert events[1]["prev_hash"] == events[0]["hash"]
        assert all(len(e["hmac"]) == 64 for e in events)
        assert "chain_seq" not in s.fetch("position", 0, 10)[0].body, "positions are not chained"
        (report,) = verify(events, KEY)
        assert report.ok and report.events == 3
    finally:
        s.close()


def test_the_chain_continues_across_restarts(tmp_path: Path) -> None:
    s = chained_store(tmp_path)
    s.append(seal(1))
    s.flush()
    s.close()
    s = chained_store(tmp_path)
    try:
        s.append(seal(2))
        s.flush()
        events = received(s)
        assert [e["chain_seq"] for e in events] == [1, 2]
        assert verify(events, KEY)[0].ok
    finally:
        s.close()


def test_a_held_event_is_chained_once_its_time_is_known(tmp_path: Path) -> None:
    s = chained_store(tmp_path)
    try:
        s.append(Reading("seal", None, {"seal": "s", "event": "opened"}, urgent=True,
                         meta={"mono_ns": 1, "boot_id": "b", "wall_ms": 1_700_000_000_000}))
        s.append(seal(2))
        s.flush()
        s.release_held(lambda mono, boot, wall: (1_790_000_000_000, True))
        s.flush()
        events = sorted(received(s), key=lambda e: e["chain_seq"])
        assert [(e["seq"], e["chain_seq"]) for e in events] == [(2, 1), (1, 2)]
        assert events[1]["ts"] == "2026-09-21T14:13:20.000Z"
        assert verify(events, KEY)[0].ok
    finally:
        s.close()


@pytest.fixture
def good_chain(tmp_path: Path) -> list[dict]:
    s = chained_store(tmp_path)
    try:
        for i in range(1, 7):
            s.append(seal(i))
        s.flush()
        return sorted(received(s), key=lambda e: e["chain_seq"])
    finally:
        s.close()


def test_verify_detects_deletion(good_chain: list[dict]) -> None:
    del good_chain[2]
    (r,) = verify(good_chain, KEY)
    assert not r.ok and r.problems == ["events 3..3 are missing (deleted or not received)"]


def test_verify_detects_alteration(good_chain: list[dict]) -> None:
    good_chain[3]["event"] = "sealed"
    (r,) = verify(good_chain, KEY)
    assert not r.ok
    assert "chain_seq 4: content does not match its hash (altered)" in r.problems


def test_verify_detects_a_rewritten_chain_without_the_key(good_chain: list[dict]) -> None:
    """Deleting event 3 and re-linking everything after it fools the hashes, not the HMAC."""
    forged = Chain("CQ-HN-0042", key=None)
    forged.restore(2, good_chain[1]["hash"])
    rest = []
    for e in good_chain[3:]:
        body = {k: v for k, v in e.items() if k not in ("chain_seq", "prev_hash", "hash", "hmac")}
        rest.append(json.loads(forged.link(json.dumps(body))))
    tampered = good_chain[:2] + rest
    assert verify(tampered)[0].ok, "without the key a consistent rewrite is possible"
    (r,) = verify(tampered, KEY)
    assert not r.ok and all("HMAC" in p for p in r.problems)


def test_verify_detects_reordering(good_chain: list[dict]) -> None:
    a, b = good_chain[1], good_chain[2]
    a["chain_seq"], b["chain_seq"] = 3, 2  # swap their places in the record
    (r,) = verify(good_chain, KEY)
    assert not r.ok and any("altered" in p or "reordered" in p for p in r.problems)


def test_duplicates_are_fine_and_conflicts_are_not(good_chain: list[dict]) -> None:
    assert verify(good_chain + [dict(good_chain[0])], KEY)[0].ok
    conflicting = dict(good_chain[0], event="sealed")
    assert not verify(good_chain + [conflicting], KEY)[0].ok


def test_verify_chain_command(good_chain: list[dict], tmp_path: Path) -> None:
    keyfile = tmp_path / "device.key"
    keyfile.write_bytes(KEY + b"\n")
    record = tmp_path / "received.jsonl"
    lines = [json.dumps({"topic": "lorry/CQ-HN-0042/seal", "payload": good_chain[:3]})]
    lines += [json.dumps(e) for e in good_chain[3:]]
    record.write_text("\n".join(lines) + "\n")

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", "verify-chain", str(record), *extra],
                              capture_output=True, text=True, cwd=REPO, timeout=60)

    ok = run("--key-file", str(keyfile))
    assert ok.returncode == 0 and "CQ-HN-0042: 6 events, chain_seq 1..6: OK" in ok.stdout
    record.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # event 4 deleted
    broken = run("--key-file", str(keyfile))
    assert broken.returncode == 1 and "events 4..4 are missing" in broken.stdout
    assert run("--key-file", str(tmp_path / "nope")).returncode == 2
