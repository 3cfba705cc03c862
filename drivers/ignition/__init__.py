"""drivers/ignition"""
