"""Measurement: timing (bench), per-op timelines (trace), result files with their metadata (results)."""
