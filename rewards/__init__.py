"""Reward functions for TRL's GRPOTrainer (retrieval rank, format, conciseness, F1) — built by a later issue."""
