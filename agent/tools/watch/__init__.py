"""``lorry-agent watch``: subscribe as the backend would and show what the lorries send.

For an installer checking a new device (``lorry-agent watch --config /etc/lorry-agent/agent.toml``
on the device itself) and for a backend engineer (``lorry-agent watch --host broker --json | jq``).

It subscribes (QoS 1, a clean session unless ``--keep-session``) to ``{prefix}/{device}/#`` and
keeps, per device: the online/offline status, the last position, seals, temperatures, CAN values
and active DTCs, the last health reading (buffer depth, satellites, clock, VIN), the recent
alarms, and per stream the readings, duplicates and the gaps in ``seq`` (computed from the set of
seq numbers received, so a backlog arriving late fills them). Every ~2 s, when something
changed, it prints a plain-text state screen (no curses: fine in any terminal and in logs), and
a final one on exit; with ``--json`` it prints every reading received instead, one JSON object
per line, and problems go to stderr.

Three layers, so each can be reused and tested alone, each in modules of one job:

- :func:`decode` (``decoding.py``): one message's payload → its readings. The only place that
  knows payload encodings: JSON, and the compact CBOR batches of docs/compact.md (agent/compact/).
- :class:`Watcher` (``watcher.py``): ``on_payload(topic, payload)`` → ``state``, a
  :class:`DeviceState` per device (``state.py``) with a :class:`SeqSet` per stream
  (``seqset.py``), and :meth:`Watcher.render`, the state screen (``render.py``). No MQTT, no
  threads of its own, never raises on bad input.
- :class:`MqttWatch` (``client.py``): the paho-mqtt plumbing (connect, reconnect with backoff,
  subscribe); :func:`watch` (``loop.py``): the screen / JSON-lines loop; :func:`main`
  (``cli.py``): the command line, its options merged with ``--config``.
"""

from agent.tools.watch.cli import UsageError, add_arguments, main, options
from agent.tools.watch.client import RECONNECT_MAX_S, RECONNECT_MIN_S, MqttWatch, Options
from agent.tools.watch.decoding import DecodeError, decode
from agent.tools.watch.loop import NOTHING_YET_HINT, SCREEN_INTERVAL_S, watch
from agent.tools.watch.render import age, duration, parse_ts
from agent.tools.watch.seqset import SHOWN_RANGES, SeqSet, format_ranges
from agent.tools.watch.state import DROPPED_STREAM_KEYS, DeviceState, StreamStats
from agent.tools.watch.watcher import NON_READING_TOPICS, RECENT_ALARMS, RECENT_PROBLEMS, Watcher

__all__ = [
    "DROPPED_STREAM_KEYS", "NON_READING_TOPICS", "NOTHING_YET_HINT", "RECENT_ALARMS", "RECENT_PROBLEMS",
    "RECONNECT_MAX_S", "RECONNECT_MIN_S", "SCREEN_INTERVAL_S", "SHOWN_RANGES",
    "DecodeError", "DeviceState", "MqttWatch", "Options", "SeqSet", "StreamStats", "UsageError", "Watcher",
    "add_arguments", "age", "decode", "duration", "format_ranges", "main", "options", "parse_ts", "watch",
]
