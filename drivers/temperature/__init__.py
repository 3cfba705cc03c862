"""drivers/temperature"""
