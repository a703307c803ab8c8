"""plait.scheduler"""
