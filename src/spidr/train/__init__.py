"""Pretraining: optimiser and schedules, checkpointing, the training loop, distributed launch."""
