"""Durable camera history: sealed clusters as crash-safe record files, indexed by a per-stream manifest."""
