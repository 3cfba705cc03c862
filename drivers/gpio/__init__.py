"""drivers/gpio"""
