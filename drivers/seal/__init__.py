"""drivers/seal"""
