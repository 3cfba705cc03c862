"""What happens to a reading between its driver and the store: fix quality, reporting policy,
geofences, alarms."""
