"""``lorry-agent demo``: the bundled trip against a private mosquitto (its data is package data)."""
