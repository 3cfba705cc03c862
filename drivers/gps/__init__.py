"""GPS: NMEA 0183 receivers (serial or capture) and gpsd, and which GNSS dates to believe."""
