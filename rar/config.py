"""Configuration of stage 2 (RAR): the script arguments beside TRL's ``GRPOConfig`` and ``ModelConfig``.

``recipes/rar_grpo.py`` parses three dataclasses with ``trl.TrlParser``::

    RARScriptArguments  data, encoder, gallery, rewards, prompt, demo stages (this file)
    trl.GRPOConfig      every transformers.TrainingArguments field + GRPO (num_generations, beta,
                        loss_type, reward_weights, max_completion_length, temperature, ...)
    trl.ModelConfig     the policy: model_name_or_path, dtype, use_peft + lora_*, load_in_4bit

so ``--config recipes/configs/X.yaml`` sets any of them and command-line flags override the YAML.
``--rl_algorithm rloo`` runs TRL's ``RLOOTrainer`` on the same arguments (``to_rloo_config``).
TRL 1.16 has no PPO trainer (not even under ``trl.experimental``), so PPO is not offered.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from rar.prompts import DEFAULT_PROMPT

ADVANTAGE_GATES = ("none", "sft_likelihood")  # --advantage_gate: rar.advantage_gate.SFTGatedGRPOTrainer

__all__ = ["POLICY_COLUMN", "RL_ALGORITHMS", "RARScriptArguments", "to_rloo_config"]

RL_ALGORITHMS = ("grpo", "rloo")
POLICY_COLUMN = (
    "policy_attributes"  # the gallery's attributes written by the starting policy (--gallery_attributes policy)
)


@dataclass
class RARScriptArguments:
    # ---------------------------------------------------------------- data
    catalog: str = field(
        default="embedded",
        metadata={
            "help": "Catalog directory, catalog.jsonl, saved dataset or hub id; 'embedded' = the synthetic catalog."
        },
    )
    split: str = field(
        default="train",
        metadata={
            "help": "Catalog split whose listings are the RL prompts (and, by default, the reward's gallery). Best "
            "kept "
            "apart from the encoder's training split: there the encoder already ranks nearly every product first "
            "and attributes can only lower the rank."
        },
    )
    sft_split: str = field(
        default="train", metadata={"help": "Catalog split the SFT warm start (--sft_recipe) trains on."}
    )
    embedded_val_fraction: float = field(
        default=0.0,
        metadata={
            "help": "With --catalog embedded: relabel this fraction of the train families split='val' (see "
            "afmrl.embedded.synthetic_catalog), e.g. to run RL on products stage 1 never saw."
        },
    )
    gallery_split: list[str] | None = field(
        default=None,
        metadata={
            "help": "Catalog split(s) the reward's gallery is built from (default: --split), e.g. `train val` for a "
            "gallery nearer a whole catalog's size; the prompts (--split) need not be among them. Ignored with "
            "--gallery."
        },
    )
    eval_split: str | None = field(
        default="test",
        metadata={"help": "Held-out split for the final no/SFT/RAR attribute table; 'none' skips the evaluation."},
    )
    max_train_listings: int | None = field(
        default=None, metadata={"help": "Use only the first N listings of --split as prompts (None = all)."}
    )
    max_eval_listings: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N listings of --eval_split (None = all)."}
    )
    cache_dir: str = field(
        default="outputs/embedded", metadata={"help": "Where the embedded catalog and the tiny models are built."}
    )
    # ---------------------------------------------------------------- encoder and gallery
    encoder: str | None = field(
        default=None,
        metadata={
            "help": "Directory of a stage-1 encoder (recipes/agcl_train.py output), frozen during RL; None = "
            "<output_dir>/encoder (where --encoder_recipe trains it)."
        },
    )
    encoder_recipe: str | None = field(
        default=None,
        metadata={
            "help": "When --encoder does not exist yet, train it first with recipes/agcl_train.py and this YAML "
            "(the demo does); None = the encoder must exist."
        },
    )
    encoder_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Backbone of the encoder that --encoder_recipe trains (the demo: the smaller pretrained tiny "
            "model, "
            "as the paper's embedder is smaller than its generator); None = --model_name_or_path. A "
            "--model_name_or_path given on the command line without this flag sets both."
        },
    )
    gallery_attributes: str = field(
        default="none",
        metadata={
            "help": "What the reward's gallery carries besides image + title, annotated once before RL: 'none', "
            "'policy' (the starting policy's greedy attributes, as a deployed catalog annotated by the generator; "
            "reward = the deployment protocol at step 0), 'reference' (the stored `attributes` column) or a "
            "column name. The reward-gallery evaluation (metrics.json's reward_gallery) uses the same gallery."
        },
    )
    gallery: str | None = field(
        default=None,
        metadata={
            "help": "A saved afmrl.retrieval.ProductGallery directory; None = encode --gallery_split with the encoder "
            "in each process."
        },
    )
    # ---------------------------------------------------------------- policy warm start
    sft_recipe: str | None = field(
        default=None,
        metadata={
            "help": "Warm-start the policy first with recipes/sft_attributes.py and this YAML (output in "
            "<output_dir>/sft, reused when present) and start RL from it; None = start from --model_name_or_path."
        },
    )
    freeze_vision: bool = field(
        default=True,
        metadata={
            "help": "Without --use_peft, keep the policy's vision tower frozen (with LoRA only the adapters train "
            "anyway)."
        },
    )
    # ---------------------------------------------------------------- rewards and prompt
    reward_funcs: list[str] = field(
        default_factory=lambda: ["retrieval_rank", "attribute_format"],
        metadata={
            "help": "Rewards: built-in names (rewards.BUILTIN_REWARDS) or 'module:function' import paths (these run "
            "your code). Weights go in --reward_weights (GRPOConfig)."
        },
    )
    reward_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of per-reward keyword arguments, e.g. "
            '\'{"retrieval_rank": {"mode": "recall_at_k", "k": 50}}\'.'
        },
    )
    attribute_keys: list[str] | None = field(
        default=None,
        metadata={"help": "Keys the generator should write, in this order (named in the prompt); None = its choice."},
    )
    prompt_template: str = field(
        default=DEFAULT_PROMPT,
        metadata={
            "help": "User prompt with {title} and {keys} placeholders; the SFT warm start must use the same one."
        },
    )
    rl_algorithm: str = field(
        default="grpo",
        metadata={
            "help": "grpo (TRL GRPOTrainer, --loss_type picks grpo/dr_grpo/dapo/bnpo/cispo/sapo/...) or rloo (TRL "
            "RLOOTrainer)."
        },
    )
    advantage_gate: str = field(
        default="none",
        metadata={
            "help": "none (GRPO as the paper) or sft_likelihood: damp each positive advantage by how much less likely "
            "the SFT reference finds the sample than its group's average (rar.advantage_gate; a variant for noisy "
            "rewards, after AdaGRPO). Needs --beta > 0 and --rl_algorithm grpo."
        },
    )
    # ---------------------------------------------------------------- evaluation
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per batch when generating for the evaluation."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "New tokens per evaluation completion (default: --max_completion_length)."}
    )

    def __post_init__(self):
        if self.rl_algorithm not in RL_ALGORITHMS:
            raise ValueError(
                f"--rl_algorithm must be one of {RL_ALGORITHMS}, got {self.rl_algorithm!r} "
                "(TRL 1.16 has no PPO trainer)"
            )
        if self.advantage_gate not in ADVANTAGE_GATES:
            raise ValueError(f"--advantage_gate must be one of {ADVANTAGE_GATES}, got {self.advantage_gate!r}")
        if self.advantage_gate != "none" and self.rl_algorithm != "grpo":
            raise ValueError(f"--advantage_gate {self.advantage_gate} gates GRPO's advantages: use --rl_algorithm grpo")
        if isinstance(self.gallery_split, str):  # `gallery_split: val` in a YAML
            self.gallery_split = [self.gallery_split]
        if isinstance(self.eval_split, str) and self.eval_split.lower() == "none":
            self.eval_split = None
        for name in ("max_train_listings", "max_eval_listings"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if self.eval_batch_size < 1:
            raise ValueError(f"--eval_batch_size must be >= 1, got {self.eval_batch_size}")
        self.reward_kwargs_dict()  # fail at parse time on bad JSON

    @property
    def gallery_splits(self) -> list[str]:
        """The splits the reward's gallery indexes (--gallery_split, else --split)."""
        return list(dict.fromkeys(self.gallery_split or [self.split]))

    @property
    def gallery_attribute_column(self) -> str | None:
        """The catalog column the gallery's attributes come from; 'policy' writes POLICY_COLUMN before RL."""
        if self.gallery_attributes in (None, "", "none"):
            return None
        return {"reference": "attributes", "policy": POLICY_COLUMN}.get(
            self.gallery_attributes, self.gallery_attributes
        )

    def reward_kwargs_dict(self) -> dict[str, dict]:
        if not self.reward_kwargs:
            return {}
        try:
            value = json.loads(self.reward_kwargs) if isinstance(self.reward_kwargs, str) else self.reward_kwargs
        except json.JSONDecodeError as err:
            raise ValueError(f"--reward_kwargs is not valid JSON: {err}") from None
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ValueError('--reward_kwargs must be a JSON object {"reward name": {"argument": value}}')
        unknown = sorted(set(value) - set(self.reward_funcs))
        if unknown:
            raise ValueError(
                f"--reward_kwargs names reward(s) {unknown} that are not in --reward_funcs {self.reward_funcs}"
            )
        return value

    def reward_entries(self) -> list:
        """``reward_funcs`` in the registry's form (a name, or {"name", "kwargs"} when it has kwargs)."""
        kwargs = self.reward_kwargs_dict()
        return [{"name": n, "kwargs": kwargs[n]} if n in kwargs else n for n in self.reward_funcs]


def to_rloo_config(grpo_args):
    """The same run as ``trl.RLOOConfig``: every field the two configs share, RLOO's own at their defaults.

    ``generation_batch_size`` is left out because GRPOConfig has already derived it from
    ``steps_per_generation`` and the two may not both be set.
    """
    from trl import RLOOConfig

    names = {f.name for f in dataclasses.fields(RLOOConfig) if f.init} & {f.name for f in dataclasses.fields(grpo_args)}
    names.discard("generation_batch_size")
    values = {n: getattr(grpo_args, n) for n in names}
    return RLOOConfig(**values)
