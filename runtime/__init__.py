"""plait.runtime"""
