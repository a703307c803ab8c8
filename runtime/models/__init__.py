"""plait.runtime.models"""
