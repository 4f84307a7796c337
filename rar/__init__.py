"""Stage 2 of AFMRL: Retrieval-aware Attribute Reinforcement (GRPO over an MLLM) — built by a later issue."""
