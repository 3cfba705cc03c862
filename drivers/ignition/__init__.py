"""The ignition state, which switches the reporting policy between moving and parked."""
