"""plait.bench"""
