"""Debounced GPIO input lines, shared by the ignition and seal drivers."""
