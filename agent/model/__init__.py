"""agent/model"""
