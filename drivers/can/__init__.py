"""The truck's CAN bus (SAE J1939): live through python-can, or a replayed capture."""
