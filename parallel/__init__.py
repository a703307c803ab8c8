"""plait.parallel"""
