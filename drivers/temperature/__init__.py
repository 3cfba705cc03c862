"""Cargo temperature sensors: DS18B20 on 1-Wire, and a simulation."""
