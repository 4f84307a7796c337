"""Stage 2 of AFMRL: Retrieval-aware Attribute Reinforcement of an attribute generator (GRPO over an MLLM).

``config`` (``RARScriptArguments``, the recipe's flags), ``prompts`` (prompt and SFT datasets from a catalog),
``policy`` (loading the policy: LoRA, 4-bit, adapters), ``annotate`` (the one resumable loop in which a generator
annotates listings), ``evaluation`` (held-out retrieval with generated attributes, both protocols, the report) and
``pipeline`` (what the demo runs around GRPO: the earlier stages, the reward gallery's annotation, the held-out
report), and ``advantage_gate`` (an optional gate on GRPO's advantages, anchored to the SFT policy). The rewards
are in ``rewards``; the recipe is ``recipes/rar_grpo.py``::

    accelerate launch --config_file deepspeed_configs/cpu.yaml recipes/rar_grpo.py
"""
