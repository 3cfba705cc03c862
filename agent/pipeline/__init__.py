"""agent/pipeline"""
