"""Customs seals and door contacts: GPIO, e-seal readers on a serial line, and a simulation."""
