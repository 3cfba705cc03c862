"""LinkSim (tests/linksim.py): the slow, costly link the benchmarks put between agent and broker.

Timing is only ever checked from below (at least the simulated latency / serialisation time):
a slow machine may take longer, never shorter.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.demo.broker import Mosquitto, mosquitto_binary
from linksim import LinkSim


class EchoServer:
    """Echoes every connection until EOF, then closes it (FIN); notes how each one ended."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ended: list[str] = []  # "eof" or "reset", one per finished connection
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        how = "eof"
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            how = "reset"
        finally:
            conn.close()
            with self._lock:
                self.ended.append(how)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def connect(sim: LinkSim) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", sim.port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(65536, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def send_in_thread(s: socket.socket, data: bytes, *, then_close: bool = False) -> threading.Thread:
    def run() -> None:
        s.sendall(data)
        if then_close:
            s.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_megabyte_each_way_arrives_intact_in_order_and_is_counted(echo: EchoServer) -> None:
    data = os.urandom(1_000_000)
    with LinkSim(echo.port, rtt_s=0.02) as sim, connect(sim) as s:
        sender = send_in_thread(s, data, then_close=True)
        back = recv_exactly(s, len(data) + 1)  # +1: must stop at the propagated FIN
        sender.join(10)
        assert back == data
        assert sim.bytes_up == len(data)
        assert wait_for(lambda: sim.bytes_down == len(data))
        assert sim.connections == 1
        assert sim.reset_counters() == (len(data), len(data))
        assert (sim.bytes_up, sim.bytes_down) == (0, 0)
    assert wait_for(lambda: echo.ended == ["eof"])


def test_a_round_trip_takes_at_least_the_rtt_and_set_changes_it_live(echo: EchoServer) -> None:
    with LinkSim(echo.port, rtt_s=0.25) as sim, connect(sim) as s:
        for i in range(3):
            t0 = time.perf_counter()
            s.sendall(b"ping %d" % i)
            assert recv_exactly(s, 6) == b"ping %d" % i
            assert time.perf_counter() - t0 >= 0.25
        sim.set(rtt_s=0.6)
        t0 = time.perf_counter()
        s.sendall(b"slower")
        assert recv_exactly(s, 6) == b"slower"
        assert time.perf_counter() - t0 >= 0.6
        # A close travels the link too: data first, then the FIN, each at least rtt/2 late.
        sim.set(rtt_s=0.2)
        t0 = time.perf_counter()
        s.sendall(b"last")
        s.shutdown(socket.SHUT_WR)
        assert recv_exactly(s, 5) == b"last"
        assert time.perf_counter() - t0 >= 0.2


def test_200_kB_at_400_kbit_s_takes_at_least_4_s(echo: EchoServer) -> None:
    data = os.urandom(200_000)
    with LinkSim(echo.port, rate_bps=400_000) as sim, connect(sim) as s:
        t0 = time.perf_counter()
        sender = send_in_thread(s, data)
        back = recv_exactly(s, len(data))
        elapsed = time.perf_counter() - t0
        sender.join(10)
        assert back == data
        assert elapsed >= 200_000 * 8 / 400_000 - 0.05
        assert (sim.bytes_up, sim.bytes_down) == (len(data), len(data))


def test_black_hole_holds_the_bytes_and_forward_delivers_them_all(echo: EchoServer) -> None:
    data = os.urandom(300_000)
    with LinkSim(echo.port, rtt_s=0.02) as sim, connect(sim) as s:
        s.sendall(b"before")
        assert recv_exactly(s, 6) == b"before"
        sim.reset_counters()
        sim.black_hole()
        sender = send_in_thread(s, data)
        s.settimeout(0.7)
        with pytest.raises(TimeoutError):
            s.recv(1)
        assert (sim.bytes_up, sim.bytes_down) == (0, 0)
        assert sim.open_connections == 1  # nothing was closed
        sim.forward()
        s.settimeout(30)
        assert recv_exactly(s, len(data)) == data
        sender.join(10)
        assert wait_for(lambda: (sim.bytes_up, sim.bytes_down) == (len(data), len(data)))


def test_drop_closes_both_sides_and_new_connections_still_work(echo: EchoServer) -> None:
    with LinkSim(echo.port, rtt_s=0.05) as sim:
        s = connect(sim)
        s.sendall(b"hello")
        assert recv_exactly(s, 5) == b"hello"
        s.sendall(b"in flight when the link goes")
        sim.drop()
        with pytest.raises(ConnectionResetError):
            while s.recv(65536):
                pass
        s.close()
        assert wait_for(lambda: len(echo.ended) == 1)  # the server's side is closed too
        assert wait_for(lambda: sim.open_connections == 0)
        with connect(sim) as s2:
            s2.sendall(b"again")
            assert recv_exactly(s2, 5) == b"again"
        assert sim.connections == 2


@pytest.fixture
def mosquitto(tmp_path: Path):
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run .ci/setup (apt-get install -y mosquitto)")
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


def test_mqtt_through_the_link_to_a_real_mosquitto(mosquitto: Mosquitto) -> None:
    """QoS 1 publishes cross the link; the counters see MQTT framing; a drop is a disconnect."""
    got: list[bytes] = []
    connects: list[float] = []
    disconnected = threading.Event()
    with LinkSim(mosquitto.port, rtt_s=0.1) as sim:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="linksim-test")
        client.reconnect_delay_set(0.05, 0.2)
        client.on_connect = lambda c, u, f, rc, p: (connects.append(time.monotonic()), c.subscribe("t/#", qos=1))
        client.on_disconnect = lambda *a: disconnected.set()
        client.on_message = lambda c, u, m: got.append(m.payload)
        client.connect("127.0.0.1", sim.port, keepalive=5)
        client.loop_start()
        try:
            assert wait_for(lambda: connects, 10)
            time.sleep(0.3)  # SUBACK back through the link
            payloads = [os.urandom(1000) for _ in range(20)]
            infos = [client.publish(f"t/{i}", p, qos=1) for i, p in enumerate(payloads)]
            for info in infos:
                info.wait_for_publish(10)
            assert wait_for(lambda: len(got) == len(payloads), 10)
            assert got == payloads
            # Up: CONNECT, SUBSCRIBE, 20 PUBLISH, 20 PUBACK; down: CONNACK, SUBACK, 20 PUBACK, 20 PUBLISH.
            topic_bytes = sum(len(f"t/{i}") for i in range(20))
            assert sim.bytes_up > 20 * 1000 + topic_bytes + 20 * 4
            assert sim.bytes_down > 20 * 1000 + topic_bytes + 20 * 4
            sim.drop()
            assert disconnected.wait(10)
            assert wait_for(lambda: len(connects) == 2, 10)  # paho reconnects through the link
            assert sim.connections == 2
        finally:
            client.loop_stop()
            client.disconnect()
