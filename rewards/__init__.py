"""Reward functions for TRL's ``GRPOTrainer`` (stage 2 of AFMRL, RAR) and their registry.

The reward signature (TRL 1.16). GRPOTrainer calls every reward as::

    reward(prompts=[...], completions=[...], completion_ids=[...],
           <column>=[...] for every other dataset column (listing_id, attributes, image, ...),
           trainer_state=TrainerState, log_metric=fn(name, value), log_extra=fn(column, values))
    -> list[float | None]    # one per completion; None = not applicable to that sample

With a conversational prompt dataset, ``prompts`` and ``completions`` are message lists
(``completions[i] == [{"role": "assistant", "content": "..."}]``); ``completion_text`` turns any
shape into a string. A reward is a plain callable with a ``__name__`` (TRL logs
``rewards/<__name__>/mean`` and ``/std``), picklable, never a ``torch.nn.Module``.

Built-ins (``get_reward_funcs`` names): ``retrieval_rank`` (``RetrievalRankReward``: does the
generated text move the true product up the gallery ranking), ``attribute_format``,
``conciseness``, ``attribute_f1`` (``rewards.attribute_rewards``). Custom rewards are named by
import path, ``package.module:function``. ``RetrievalRankReward`` is imported lazily, so
``import rewards`` does not load torch models.
"""

from afmrl._lazy import lazy_exports
from rewards.attribute_rewards import (
    AttributeF1Reward,
    AttributeFormatReward,
    ConcisenessReward,
    completion_text,
    parse_completion,
)
from rewards.registry import BUILTIN_REWARDS, get_reward_funcs, resolve_reward, validate_reward_weights

__getattr__, _ = lazy_exports(__name__, {"RetrievalRankReward": "rewards.retrieval_rank"})

__all__ = [
    "BUILTIN_REWARDS",
    "AttributeF1Reward",
    "AttributeFormatReward",
    "ConcisenessReward",
    "RetrievalRankReward",
    "completion_text",
    "get_reward_funcs",
    "parse_completion",
    "resolve_reward",
    "validate_reward_weights",
]
