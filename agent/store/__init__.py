"""agent/store"""
