"""Store → backend: what to send next, over MQTT, within the link's and the data plan's limits,
and the remote command channel."""
