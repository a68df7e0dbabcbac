"""Per-stage training loops (run inside Ray Train workers), checkpoints, EMA, schedules."""
