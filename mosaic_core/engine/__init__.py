"""The streaming engine: attention plans, per-stream state, retrieval and the Engine facade."""
