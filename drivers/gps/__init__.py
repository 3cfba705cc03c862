"""drivers/gps"""
