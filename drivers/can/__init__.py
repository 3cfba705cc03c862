"""drivers/can"""
