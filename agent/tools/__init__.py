"""agent/tools"""
