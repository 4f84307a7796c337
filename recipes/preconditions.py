"""Before you spend GPU time: can this catalog, encoder and generator show the paper's gains? Seven gates.

    python recipes/preconditions.py --catalog data/my_catalog --encoder outputs/my-encoder \
        --generator outputs/my-sft --agcl_config recipes/configs/agcl_qwen2vl_2b.yaml --pilot outputs/pilot/ladder.json
    python recipes/preconditions.py --catalog outputs/embedded/catalog-600-seed0-val0.3 \
        --encoder outputs/rar-demo/encoder --generator outputs/rar-demo/sft \
        --agcl_config recipes/configs/agcl_demo.yaml --pilot docs/results/ladder.json      # the demo's world

Each gain of AFMRL rests on a condition of the paper's world; this command measures them on yours and prints each
figure beside its pass line (``afmrl.preconditions``: the gates' arithmetic and the lines, fixed in advance): G1 the
embedder blurs near-duplicates, G2 the generator perceives what tells them apart, G3 attributes have headroom, G4 RL
can reach some of it with what the generator knows, G5 the reward's signal stands above a GRPO group's spread, G6
stage 1's batches hold near-duplicates and false negatives and attribute BM25 finds them, G7 enough seeds and test
listings to see the paper's effect. A catalog without true attributes (``--truth_column``) gets what can be measured
without them; the table says which gates were skipped and why. Writes ``preconditions.json``, ``preconditions.md``
and the generator's lines (``lines.jsonl``) to ``--output_dir``. Minutes on the demo's catalog (the generator samples
``--samples`` lines per listing of the RL and test splits).
"""

import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml
from datasets import concatenate_datasets
from tqdm.auto import tqdm

from afmrl.attributes import BM25Scorer, attribute_signature, canonical_attributes, format_attributes, parse_attributes
from afmrl.catalog import load_catalog
from afmrl.cli import run_cli
from afmrl.embedded import resolve_catalog, resolve_model
from afmrl.encoder.model import ProductEncoder, encode_catalog
from afmrl.preconditions import (
    EDITS,
    PAPER_DELTA,
    PASS_LINES,
    auc,
    edit_line,
    families,
    habit_values,
    key_accuracy,
    minimal_detectable_effect,
    restored_keys,
    seeds_needed,
    teacher_habits,
    toward_teacher,
    within_family_recall,
)
from afmrl.retrieval import ProductGallery
from afmrl.retrieval.metrics import metrics_from_search
from afmrl.stats import summarize
from agcl.data import GroupedBatchSampler, ProductPairDataset
from rar.annotate import annotate, load_generator, sample_attributes
from rar.config import POLICY_COLUMN
from rar.evaluation import evaluate_attribute_sources
from rar.prompts import DEFAULT_PROMPT, PROMPT_FILE, build_prompt_dataset
from rewards import RetrievalRankReward

HABITS = "the habits (drop, undo, restore)"
TOWARD = "toward the teacher (where its own samples reach)"
GATES = ("G1", "G2", "G3", "G4", "G5", "G6", "G7")
TITLES = {
    "G1": "the embedder blurs near-duplicates",
    "G2": "the generator perceives what separates them",
    "G3": "attributes have headroom (both sides)",
    "G4": "RL can reach headroom with what the generator knows",
    "G5": "the reward's signal stands above a group's spread",
    "G6": "stage 1's batches hold what AGCL acts on",
    "G7": "power: seeds and test listings for the paper's effect",
}
LADDER = [
    ("AGCL", "InfoNCE encoder", "+ AGCL"),
    ("SFT attributes", "+ AGCL", "+ SFT (distilled) attributes"),
    ("RAR", "+ SFT (distilled) attributes", "+ RAR attributes"),
]


@dataclass
class PreconditionsArguments:
    catalog: str = field(metadata={"help": "Catalog directory, saved dataset, hub id or 'embedded'."})
    encoder: str = field(metadata={"help": "The stage-1 encoder (recipes/agcl_train.py output)."})
    generator: str | None = field(
        default=None, metadata={"help": "The SFT generator RL would start from; without it G2-G5 are skipped."}
    )
    output_dir: str = field(default="outputs/preconditions", metadata={"help": "Where the JSON and table go."})
    eval_split: str = field(default="test", metadata={"help": "Held-out products: G1-G4 and G7's test listings."})
    train_split: str = field(default="train", metadata={"help": "Stage 1's split (G6) and the teacher's habits (G4)."})
    rl_split: str | None = field(
        default=None,
        metadata={"help": "The RL prompts and reward gallery (G4-G5); default: val if present, else train."},
    )
    truth_column: str = field(default="true_attributes", metadata={"help": "Column of the true attributes."})
    teacher_column: str = field(default="attributes", metadata={"help": "Column of the teacher's attributes."})
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "The generator's prompt (default: attribute_prompt.json beside the generator or in its parent "
            "directory, else rar.prompts.DEFAULT_PROMPT)."
        },
    )
    attribute_keys: list[str] | None = field(default=None, metadata={"help": "Keys named in the prompt."})
    samples: int = field(
        default=8, metadata={"help": "Sampled lines per listing (a GRPO group: G4's restored keys, G5's spread)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the RL run."})
    max_new_tokens: int = field(default=64, metadata={"help": "New tokens per generated line."})
    reward_kwargs: str = field(
        default='{"mode": "recall_at_k", "k": 50}',
        metadata={
            "help": 'RetrievalRankReward arguments of the RL run, JSON (default: the paper\'s Recall@50); "k": "auto" '
            "fixes k by the fair test's rule before any RL run (the smallest k whose no-attribute Recall@k of the RL "
            "prompts reaches --k_target)."
        },
    )
    k_target: float = field(default=0.85, metadata={"help": 'The rule of "k": "auto" (the fair test: 0.85).'})
    gallery_split: list[str] | None = field(
        default=None,
        metadata={"help": "The reward gallery's splits (default: the RL split alone)."},
    )
    gallery_attributes: str = field(
        default="policy",
        metadata={
            "help": "What the reward gallery's listings carry (rar_grpo.py's flag of the same name): 'policy' (the "
            "SFT policy's greedy lines), 'reference' (the stored `attributes` column: the teacher's lines) or a "
            "column name."
        },
    )
    rl_prompts: int | None = field(
        default=None, metadata={"help": "Prompts the RL run will draw (default: the RL split's listings, once)."}
    )
    max_rl_listings: int | None = field(
        default=None,
        metadata={
            "help": "A budget: G4's reward δ and G5's spread are measured on this many RL listings drawn at random "
            "(seed 0); the rest are still annotated into the reward gallery. Default: all of them."
        },
    )
    agcl_config: str | None = field(
        default=None,
        metadata={
            "help": "Stage 1's YAML (recipes/configs/...): its batch size, batch_grouping, signature_keys, seed and "
            "base model are what G6 counts with."
        },
    )
    encoder_base: str | None = field(
        default=None,
        metadata={
            "help": "The backbone stage 1 started from (G6's step-0 cosine; default: --agcl_config's "
            "model_name_or_path, else the encoder's own backbone when it names one)."
        },
    )
    headroom: str = field(
        default="habits",
        metadata={
            "help": "What G4 and G5 gate on as RL's reachable headroom: 'habits' (the teacher's habits undone with "
            "what the generator knows: right for a reward gallery that carries no habit) or 'teacher' (the SFT line "
            "moved toward the listing's teacher line where at least a quarter of its own samples make the "
            "teacher's choice: right for a gallery the teacher wrote, since a retrieval reward moves the policy "
            "toward its gallery's annotator). The other is reported.",
            "choices": ["habits", "teacher"],
        },
    )
    epochs: int = field(default=3, metadata={"help": "Sampler epochs G6 averages over."})
    pilot: list[str] | None = field(
        default=None,
        metadata={
            "help": "Per-seed results of a pilot (a ladder.json of python -m benchmarks.ladder, or a "
            "docs/experiments/rar_seeds/*.json): the spread G7 sizes the seeds from."
        },
    )
    fine_keys: list[str] | None = field(
        default=None,
        metadata={
            "help": "The world's fine keys: G1 requires them blurred and G2 perceived; other keys that happen to "
            "vary within a family are reported, not checked (default: every varying key)."
        },
    )
    embedded_val_fraction: float = field(default=0.0, metadata={"help": "With --catalog embedded: val share."})
    cache_dir: str = field(default="outputs/embedded", metadata={"help": "Where 'embedded' is built."})
    batch_size: int = field(default=32, metadata={"help": "Encoding and generation batch."})

    def __post_init__(self):
        if self.samples < 2 and self.generator:
            raise ValueError("--samples must be at least 2 (a group's spread needs two lines)")
        if self.temperature <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--temperature must be > 0, --epochs and --batch_size >= 1")
        if self.headroom not in ("habits", "teacher"):
            raise ValueError(f"--headroom {self.headroom!r} is not one of ['habits', 'teacher']")
        if self.max_rl_listings is not None and self.max_rl_listings < 2:
            raise ValueError("--max_rl_listings must be at least 2")
        try:
            self.reward = json.loads(self.reward_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--reward_kwargs is not JSON: {err}") from None


# ---------------------------------------------------------------------------------------------- results
SIGNED = ("G1_blur_over_chance", "G2_key_alone_over_embedder", "G3_", "G4_", "G6_bm25_auc_over_cosine")


def check(figure: str, value: float, shown: str, line: str, at_most: bool = False) -> list:
    """A table row: the figure, its value as shown, its pass line (``PASS_LINES[line]``) and whether it passes."""
    bound = PASS_LINES[line]
    ok = value <= bound if at_most else value >= bound
    bound_text = f"{bound:+g}" if line.startswith(SIGNED) else f"{bound:,g}"
    return [figure, shown, f"{'≤' if at_most else '≥'} {bound_text}", bool(ok)]


def gate(rows: list, note: str = "", status: str | None = None) -> dict:
    """A gate's rows; it passes when every checked row passes (rows with ok None are reported, not checked)."""
    checked = [ok for *_, ok in rows if ok is not None]
    status = status or ("pass" if checked and all(checked) else "fail" if checked else "skipped")
    return {"status": status, "rows": rows, "note": note}


def skipped(why: str) -> dict:
    return gate([], why, "skipped")


def table(results: dict) -> str:
    lines = ["| gate | figure | value | pass line | verdict |", "|---|---|---|---|---|"]
    for name in GATES:
        g, head = results[name], f"**{name}** {TITLES[name]}"
        if g["status"] == "skipped":
            lines.append(f"| {head} | — | — | — | skipped: {g['note']} |")
            continue
        for i, (figure, value, line, ok) in enumerate(g["rows"]):
            mark = "" if ok is None else "pass" if ok else "**fail**"
            lines.append(f"| {head if i == 0 else ''} | {figure} | {value} | {line} | {mark} |")
        if g["note"]:
            lines.append(f"| | {g['note']} | | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- inputs
def prompt_of(args) -> str:
    if args.prompt_template:
        return args.prompt_template
    for folder in (Path(args.generator), Path(args.generator).parent):
        if (folder / PROMPT_FILE).is_file():
            return json.loads((folder / PROMPT_FILE).read_text(encoding="utf-8"))["prompt_template"]
    return DEFAULT_PROMPT


def truths(ds, column: str) -> list[dict]:
    return [{str(k): str(v) for k, v in (t or {}).items()} for t in ds[column]]


def r_at_1(metrics: dict) -> float:
    return 100 * metrics["recall@1"]


def generate(args, evaluation, rl, gallery_rows) -> dict:
    """The generator's greedy lines and ``--samples`` sampled lines per listing on the test and RL splits, and its
    greedy lines on the reward gallery's other listings (only where the gallery carries the policy's lines)."""
    template = prompt_of(args)
    model, processor = load_generator(args.generator, cache_dir=args.cache_dir)
    out = {}
    roles = (("eval", evaluation), ("rl", rl), ("gallery", gallery_rows))
    for name, ds in roles if args.gallery_attributes == "policy" else roles[:2]:
        texts = annotate(
            ds,
            (model, processor),
            prompt_template=template,
            attribute_keys=args.attribute_keys,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            show_progress=False,
        )
        draws = []
        if name != "gallery":
            prompts = build_prompt_dataset(ds, prompt_template=template, attribute_keys=args.attribute_keys)
            draws = sample_attributes(
                model,
                processor,
                prompts,
                draws=args.samples,
                temperature=args.temperature,
                batch_size=args.batch_size,
                show_progress=False,
            )
        out[name] = {
            "texts": texts,
            "lines": [parse_attributes(t).attributes for t in texts],
            "draws": draws,
            "samples": [[parse_attributes(d[i]).attributes for d in draws] for i in range(len(ds))],
        }
    return out  # fmt: skip


def save_lines(path: Path, datasets: dict, generated: dict) -> None:
    """Every line the gates read (a row per listing: its role, greedy line and samples), for analyses after the
    fact without generating again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for role, ds in datasets.items():
            g = generated[role]
            for i, lid in enumerate(ds["listing_id"]):
                samples = [d[i] for d in g["draws"]]
                f.write(json.dumps({"listing_id": lid, "role": role, "greedy": g["texts"][i], "samples": samples}))
                f.write("\n")


# ---------------------------------------------------------------------------------------------- the gates
def g1(sims: np.ndarray, fam, fine_keys) -> tuple[dict, dict]:
    per_key = within_family_recall(sims, fam)
    rows = []
    for key, m in per_key.items():
        over = 100 * (m["recall@1"] - m["chance"])
        row = check(
            f"within-family R@1 − chance, `{key}` (n={m['n']})",
            over,
            f"{100 * m['recall@1']:.1f} − {100 * m['chance']:.1f} = {over:+.1f}",
            "G1_blur_over_chance",
            True,
        )
        rows.append(row if key in (fine_keys or per_key) else [*row[:3], None])
    return gate(rows), per_key  # fmt: skip


def g2(eval_ds, truth, sft, fam, embedder: dict, fine_keys=None, habits: dict | None = None) -> dict:
    keys = sorted(embedder)
    skip = habit_values(habits or {})
    accuracy = key_accuracy(truth, sft, eval_ds["title"], keys, skip=skip)
    every = key_accuracy(truth, sft, eval_ds["title"], keys)
    rows = []
    for key in keys:
        first = len(rows)
        if key in accuracy:
            a = accuracy[key]
            habit = f", not {'/'.join(sorted(skip[key]))} (the teacher's habit)" if skip.get(key) else ""
            rows.append(check(f"greedy accuracy, `{key}`, title silent{habit} (n={a['n']})", a["accuracy"],
                              f"{a['accuracy']:.2f}", "G2_accuracy"))  # fmt: skip
        if skip.get(key) and key in every:
            rows.append([f"greedy accuracy, `{key}`, title silent, every value (reported; n={every[key]['n']})",
                         f"{every[key]['accuracy']:.2f}", "", None])  # fmt: skip
        values = np.asarray([line.get(key) for line in sft], dtype=object)
        same = (values[:, None] == values[None, :]) & (values[:, None] != None)  # noqa: E711 (object array)
        alone = within_family_recall(same.astype(np.float32), fam).get(key)
        if alone is not None:
            gain = 100 * (alone["recall@1"] - embedder[key]["recall@1"])
            shown = f"{100 * alone['recall@1']:.1f} − {100 * embedder[key]['recall@1']:.1f} = {gain:+.1f}"
            rows.append(check(f"`{key}` alone − embedder, within family", gain, shown, "G2_key_alone_over_embedder"))
        if fine_keys and key not in fine_keys:  # varies within a family by chance, not by the world's design
            rows[first:] = [[*row[:3], None] for row in rows[first:]]
    return gate(rows)


def g3(r1: dict) -> dict:
    pairs = (("true", "none", "G3_true_minus_none"), ("sft", "none", "G3_sft_minus_none"),
             ("true", "sft", "G3_true_minus_sft"))  # fmt: skip
    rows = [check(f"R@1 {a} − {b}", r1[a] - r1[b], f"{r1[a]:.1f} − {r1[b]:.1f} = {r1[a] - r1[b]:+.1f}", line)
            for a, b, line in pairs if a in r1 and b in r1]  # fmt: skip
    return gate(rows, "" if "true" in r1 else "no true attributes: only SFT − none")


def rewards_of(reward, ids: list[str], lines: list[str]) -> np.ndarray:
    return np.asarray([np.nan if r is None else r for r in reward(completions=lines, listing_id=ids)], dtype=float)


def choose_k(encoder, queries, gallery, gallery_texts: list, target: float, batch_size: int) -> tuple[int, float]:
    """The fair test's rule for the reward's k, fixed before RL: the smallest k whose Recall@k (the share of a query's
    identical listings in its top k, the paper's reward) of the RL prompts without attributes, against the annotated
    gallery, reaches ``target`` on average."""
    depth = min(len(gallery) - 1, 1000)
    vectors = encode_catalog(encoder, gallery, gallery_texts, batch_size=batch_size, show_progress=False)
    index = ProductGallery.from_embeddings(vectors, gallery["listing_id"], gallery["product_id"], index_type="flat")
    queries_vectors = encode_catalog(encoder, queries, batch_size=batch_size, show_progress=False)
    own = index.rows_of(list(queries["listing_id"]))
    scores, rows = index.search(queries_vectors, depth, exclude=own)
    recall = metrics_from_search(
        rows,
        scores,
        np.asarray(queries["product_id"]),
        np.asarray(gallery["product_id"]),
        ks=range(1, depth + 1),
        map_k=None,
        exclude=own,
        skip_queries_without_positive=True,
    )
    k = next((k for k in range(1, depth + 1) if recall[f"recall_fraction@{k}"] >= target), depth)
    return k, float(recall[f"recall_fraction@{k}"])  # fmt: skip


def g4_g5(
    args, rl, gallery_rows, generated: dict, edited_rl: list, r1: dict, habits: dict, parts_rl: dict | None = None
) -> tuple[dict, dict]:
    """The edited lines against the SFT lines in the headline protocol (``r1``) and in the reward's (each edit alone
    too, ``parts_rl``: reported), and the reward's spread within a group of the generator's own samples. The reward
    gallery (the RL split, or ``--gallery_split``) carries the SFT policy's lines; its k is fixed by ``choose_k`` when
    asked for ("auto")."""
    lookup = concatenate_datasets([rl, gallery_rows]) if len(gallery_rows) else rl
    if args.gallery_attributes == "policy":
        policy = dict(zip(rl["listing_id"], generated["rl"]["lines"], strict=True))
        policy.update(zip(gallery_rows["listing_id"], generated["gallery"]["lines"], strict=True))
        lines, source = [policy[lid] or None for lid in lookup["listing_id"]], "the SFT policy"
    else:
        column = gallery_column(args)
        lines, source = [a or None for a in lookup[column]], f"the catalog's {column!r} column"
    lookup = lookup.add_column(POLICY_COLUMN, lines)
    splits = list(dict.fromkeys(args.gallery_split or [args.rl_split]))
    reward_kwargs, rule = dict(args.reward), ""
    if reward_kwargs.get("k") == "auto":
        gallery = lookup.filter(lambda s: s in splits, input_columns="split")
        texts = [format_attributes(a) or None for a in gallery[POLICY_COLUMN]]
        reward_kwargs["k"], reached = choose_k(
            ProductEncoder.from_pretrained(args.encoder), rl, gallery, texts, args.k_target, args.batch_size
        )
        k, relation = reward_kwargs["k"], "≥" if reached >= args.k_target else "<"
        limit = "" if reached >= args.k_target else ", the rule's deepest k: it never reaches its target"
        rule = f" (k by the rule: no-attribute Recall@{k} = {reached:.2f} {relation} {args.k_target}{limit})"
    options = {"attribute_column": POLICY_COLUMN, **({"split": splits} if splits != [args.rl_split] else {})}
    reward = RetrievalRankReward(encoder=args.encoder, catalog=lookup, gallery_options=options, **reward_kwargs)
    sft = generated["rl"]["lines"]  # fmt: skip
    ids = list(rl["listing_id"])
    base = rewards_of(reward, ids, [format_attributes(line) or "none" for line in sft])
    delta = rewards_of(reward, ids, [line or "none" for line in edited_rl]) - base
    part_delta = {part: float(np.nanmean(rewards_of(reward, ids, [line or "none" for line in lines]) - base))
                  for part, lines in (parts_rl or {}).items()}  # fmt: skip
    # The reward's own ceiling for a line: the words its gallery already holds for the query's product (the most
    # common policy line among the product's other listings). No policy can know them; the reward counts nothing else.
    twin = own_product_lines(lookup, ids)
    own = [twin.get(i) or format_attributes(line) or "none" for i, line in zip(ids, sft, strict=True)]
    ceiling = rewards_of(reward, ids, own)
    part_delta["own product's gallery line (the reward's ceiling)"] = float(np.nanmean(ceiling - base))
    # What RL can win against a gallery the teacher wrote: the student's distance to its teacher (the query's own
    # stored line), since a retrieval reward moves the policy toward the gallery's annotator, habits included.
    if args.teacher_column in rl.column_names:
        taught = [format_attributes(a) or format_attributes(line) or "none" for a, line in
                  zip(rl[args.teacher_column], sft, strict=True)]  # fmt: skip
        part_delta["the teacher's own line (the student's distance to it)"] = float(
            np.nanmean(rewards_of(reward, ids, taught) - base)
        )
    group = np.stack([rewards_of(reward, ids, list(draw)) for draw in generated["rl"]["draws"]])  # [draw, listing]
    ok = ~np.isnan(delta) & ~np.isnan(group).any(axis=0)
    d, sigma = float(np.mean(delta[ok])), float(np.mean(group[:, ok].std(axis=0, ddof=1)))
    head = r1["edited"] - r1["sft"]
    merges = sum(map(len, habits.get("merges", {}).values()))
    edits = (f"edits: drop {habits['listing_keys'] or 'no'} listing-level keys, undo "
             f"{sum(map(len, habits['confusions'].values()))} systematic confusions ({merges} into a real value, "
             f"undone where ≥ 25% of the {args.samples} samples name the meant one), restore the keys at least half "
             "of the samples name")  # fmt: skip
    if args.headroom == "teacher":
        edits = (f"edited: the SFT line moved toward the listing's teacher line, key by key, where ≥ 25% of the "
                 f"{args.samples} samples make the teacher's choice (a gallery the teacher wrote rewards its "
                 f"annotator); reported, the habit {edits}")  # fmt: skip
    g4 = gate([check("R@1 edited − SFT (both sides)", head, f"{r1['edited']:.1f} − {r1['sft']:.1f} = {head:+.1f}",
                     "G4_edited_minus_sft"),
               ["reward δ, edited − SFT (the reward's protocol)", f"{d:+.4f}", "> 0", d > 0],
               *[[f"R@1 {name} − SFT (reported: which edit moves it)", f"{r1[name] - r1['sft']:+.1f}", "", None]
                 for name in r1 if name.startswith("edited: ")],
               *[[f"reward δ, {part} only − SFT (reported)", f"{value:+.4f}", "", None]
                 for part, value in part_delta.items()]], edits)  # fmt: skip
    measured = f"{len(rl):,} of the " if len(rl) < args.rl_prompts else "the "
    note = (f"reward {json.dumps(reward_kwargs)} on {measured}{args.rl_split!r} prompts, gallery {' + '.join(splits)} "
            f"annotated by {source}{rule}")  # fmt: skip
    g5 = signal_gate(sigma, d, args.rl_prompts, note)
    return g4, g5  # fmt: skip


def gallery_column(args) -> str:
    """The catalog column ``--gallery_attributes`` names ('reference': the stored ``attributes``)."""
    return "attributes" if args.gallery_attributes == "reference" else args.gallery_attributes


def own_product_lines(lookup, ids: list[str]) -> dict[str, str]:
    """For each listing of ``ids``: the most common non-empty policy line among its product's other listings in
    ``lookup`` (absent where the product has none)."""
    by_product: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for lid, pid, line in zip(lookup["listing_id"], lookup["product_id"], lookup[POLICY_COLUMN], strict=True):
        if line:
            by_product[pid].append((lid, format_attributes(line)))
    product = dict(zip(lookup["listing_id"], lookup["product_id"], strict=True))
    out = {}
    for lid in ids:
        others = Counter(text for other, text in by_product[product[lid]] if other != lid and text)
        if others:
            out[lid] = others.most_common(1)[0][0]
    return out


def signal_gate(sigma: float, delta: float, prompts: int, note: str = "") -> dict:
    """G5: a group's reward spread ``sigma`` against the gain ``delta`` worth finding, and the prompts the run draws
    against (sigma/delta)^2 (a delta <= 0 is never found)."""
    ratio = (sigma / delta) ** 2 if delta > 0 else math.inf
    return gate([check("(σ/δ)², σ = a group's reward sd", ratio, f"({sigma:.4f} / {delta:+.4f})² = {ratio:,.0f}",
                       "G5_sigma_over_delta_squared", True),
                 check("prompts the run draws ÷ (σ/δ)²", prompts / ratio, f"{prompts:,} ÷ {ratio:,.0f}",
                       "G5_prompts_per_noise")], note)  # fmt: skip


def g6_counts(train, fam, args, config: dict, base_vectors: np.ndarray | None) -> dict:
    """Per query and batch, as stage 1's sampler builds them: family-mates, false negatives (duplicate SKUs), the
    attribute filter against true identity, and how attribute BM25 and the step-0 cosine rank family-mates."""
    batch, seed = int(config.get("per_device_train_batch_size", 8)), int(config.get("seed", 42))
    column = config.get("attribute_column") or args.teacher_column
    teacher = list(train[column])
    texts = [format_attributes(a) for a in teacher]
    scorer = BM25Scorer(texts, k1=float(config.get("bm25_k1", 1.2)), b=float(config.get("bm25_b", 0.75)))
    keys = config.get("signature_keys")
    signature = [attribute_signature(a, keys or sorted(a)) if a else None for a in teacher]
    pairs = ProductPairDataset(train, seed=seed)
    grouping = config.get("batch_grouping")
    sampler = GroupedBatchSampler(pairs.product_groups(grouping), seed=seed) if grouping else None
    n = Counter()
    bm25_auc, cos_auc = [], []
    for epoch in range(args.epochs):
        pairs.set_epoch(epoch)
        order = list(sampler) if sampler else np.random.default_rng(seed + epoch).permutation(len(pairs)).tolist()
        for start in range(0, len(order), batch):
            items = [pairs[i] for i in order[start : start + batch]]
            q, c = [it["query"] for it in items], [it["positive"] for it in items]
            bm25 = scorer.score([texts[i] for i in q], [texts[j] for j in c])
            cos = None if base_vectors is None else base_vectors[q] @ base_vectors[c].T
            for a in range(len(items)):
                kinds = {b: fam.key_between(int(fam.codes[q[a]]), int(fam.codes[c[b]])) for b in range(len(items))}
                mates = [b for b, key in kinds.items() if key and b != a]
                others = [b for b, key in kinds.items() if key is None and b != a]
                for b, key in kinds.items():
                    if b != a:
                        dup, mask = key == "", signature[q[a]] is not None and signature[q[a]] == signature[c[b]]
                        n.update(duplicates=dup, masked=mask, caught=dup and mask)
                n.update(queries=1, mates=len(mates))
                if mates and others:
                    bm25_auc.append(auc(bm25[a, mates], bm25[a, others]))
                    if cos is not None:
                        cos_auc.append(auc(cos[a, mates], cos[a, others]))
    return {"mates": n["mates"] / n["queries"], "false_negatives": n["duplicates"] / n["queries"],
            "precision": n["caught"] / n["masked"] if n["masked"] else math.nan, "masked": n["masked"],
            "recall": n["caught"] / n["duplicates"] if n["duplicates"] else math.nan, "duplicates": n["duplicates"],
            "bm25_auc": float(np.mean(bm25_auc)) if bm25_auc else math.nan, "queries": n["queries"],
            "cosine_auc": float(np.mean(cos_auc)) if cos_auc else math.nan, "batch_size": batch,
            "epochs": args.epochs}  # fmt: skip


def g6(c: dict) -> dict:
    rows = [check("family-mates per query per batch", c["mates"], f"{c['mates']:.2f}", "G6_family_mates_per_query"),
            check("false negatives per query per batch", c["false_negatives"], f"{c['false_negatives']:.3f}",
                  "G6_false_negatives_per_query"),
            check(f"attribute filter precision ({c['masked']} masked)", c["precision"], f"{c['precision']:.2f}",
                  "G6_filter_precision"),
            check(f"attribute filter recall ({c['duplicates']} duplicate pairs)", c["recall"], f"{c['recall']:.2f}",
                  "G6_filter_recall")]  # fmt: skip
    gain = c["bm25_auc"] - c["cosine_auc"]
    if math.isnan(c["cosine_auc"]):
        rows.append(
            ["family-mate AUC of BM25 (no step-0 cosine: pass --encoder_base)", f"{c['bm25_auc']:.2f}", "", None]
        )
    else:
        rows.append(
            check(
                "family-mate AUC: BM25 − step-0 cosine",
                gain,
                f"{c['bm25_auc']:.2f} − {c['cosine_auc']:.2f} = {gain:+.2f}",
                "G6_bm25_auc_over_cosine",
            )
        )
    note = f"batches of {c['batch_size']} products as stage 1's sampler draws them, {c['epochs']} epochs, "
    note += f"{c['queries']:,} queries"
    return {**gate(rows, note), "counts": c}  # the figures unrounded, for comparing seeds or catalogs


def pilot_differences(paths: list[str]) -> dict[str, list[float]]:
    """Per rung, the per-seed R@1 differences (points) a pilot measured."""
    out: dict[str, list[float]] = {}
    for path in paths:
        seeds = json.loads(Path(path).read_text(encoding="utf-8"))["seeds"]
        first = next(iter(seeds.values()))
        if "sft_attributes" in first:  # a rar_seeds record: RAR - SFT per GRPO seed
            diffs = [r_at_1(m["rar_attributes"]) - r_at_1(m["sft_attributes"]) for m in seeds.values()]
            out.setdefault("RAR", []).extend(diffs)
            continue
        for rung, low, high in LADDER:  # a ladder.json: every rung per seed
            if low in first and high in first:
                diffs = [r_at_1(r[high]["instance"]) - r_at_1(r[low]["instance"]) for r in seeds.values()]
                out.setdefault(rung, []).extend(diffs)
    return out


def g7(n_test: int, differences: dict[str, list[float]]) -> dict:
    rows = [check("test listings", n_test, f"{n_test:,}", "G7_test_listings")]
    for rung, delta in PAPER_DELTA.items():
        if len(differences.get(rung, [])) >= 2:
            s = summarize(differences[rung])
            need = seeds_needed(s["sd"], delta, power=PASS_LINES["G7_power"])
            mde = minimal_detectable_effect(s["sd"], s["n"], power=PASS_LINES["G7_power"])
            rows.append([f"seeds to detect the paper's {rung} Δ {delta:+.1f} at 80% power (pilot sd {s['sd']:.2f}, "
                         f"n = {s['n']}, whose MDE is {mde:.1f})", "over 1,000" if need is None else f"{need}",
                         "reported", None])  # fmt: skip
    return gate(rows, "" if len(rows) > 1 else "no --pilot: the seeds are not sized")


# ---------------------------------------------------------------------------------------------- main
def main(args: PreconditionsArguments) -> dict:
    started = time.time()
    catalog = resolve_catalog(args.catalog, args.cache_dir, val_fraction=args.embedded_val_fraction)
    evaluation = load_catalog(catalog, split=args.eval_split)
    train = load_catalog(catalog, split=args.train_split, verify_images=False)
    if args.rl_split is None:
        args.rl_split = "val" if "val" in set(load_catalog(catalog, verify_images=False)["split"]) else args.train_split
    rl = load_catalog(catalog, split=args.rl_split, verify_images=False)
    config = yaml.safe_load(Path(args.agcl_config).read_text(encoding="utf-8")) if args.agcl_config else {}
    if not isinstance(config, dict):
        raise ValueError(f"--agcl_config {args.agcl_config!r} is not a YAML mapping")
    for path in args.pilot or []:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--pilot {path!r} does not exist")
    if args.gallery_attributes != "policy" and gallery_column(args) not in rl.column_names:
        raise ValueError(f"--gallery_attributes {args.gallery_attributes!r}: the catalog has no "
                         f"{gallery_column(args)!r} column")  # fmt: skip
    has_truth = args.truth_column in evaluation.column_names
    no_truth = f"the catalog has no {args.truth_column!r} column"
    if args.fine_keys and has_truth:  # before any model loads: a misspelt key would leave G1 and G2 unchecked
        known = {str(k) for t in evaluation[args.truth_column] for k, v in (t or {}).items() if v is not None}
        unknown = sorted(set(args.fine_keys) - known)
        if unknown:
            raise ValueError(f"--fine_keys {unknown}: not keys of the {args.truth_column!r} column (its keys: "
                             f"{', '.join(sorted(known))})")  # fmt: skip
    encoder = ProductEncoder.from_pretrained(args.encoder)
    results: dict[str, dict] = {}
    bar = tqdm(total=len(GATES), desc="preconditions", unit="gate")

    # G1: near-duplicates without attributes, through the encoder
    if has_truth:
        truth_eval = truths(evaluation, args.truth_column)
        fam = families(evaluation["product_id"], truth_eval)
        vectors = encode_catalog(encoder, evaluation, batch_size=args.batch_size, show_progress=False)
        results["G1"], embedder = g1(vectors @ vectors.T, fam, args.fine_keys)
    else:
        results["G1"] = skipped(no_truth)
    bar.update()

    # G2-G5: the generator's greedy lines and a group of samples per listing, on the test and RL splits
    if not args.generator:
        results.update({name: skipped("no --generator") for name in ("G2", "G3", "G4", "G5")})
    else:
        others = [name for name in dict.fromkeys(args.gallery_split or []) if name != args.rl_split]
        gallery_rows = load_catalog(catalog, split=others, verify_images=False) if others else rl.select([])
        args.rl_prompts = args.rl_prompts or len(rl)
        if args.max_rl_listings and args.max_rl_listings < len(rl):  # the budget: the rest join the gallery only
            order = np.random.default_rng(0).permutation(len(rl))
            rest = rl.select(sorted(order[args.max_rl_listings :].tolist()))
            gallery_rows = concatenate_datasets([gallery_rows, rest]) if len(gallery_rows) else rest
            rl = rl.select(sorted(order[: args.max_rl_listings].tolist()))
        generated = generate(args, evaluation, rl, gallery_rows)
        read = {"eval": evaluation, "rl": rl, **({"gallery": gallery_rows} if "gallery" in generated else {})}
        save_lines(Path(args.output_dir) / "lines.jsonl", read, generated)
        habits = teacher_habits(list(train[args.teacher_column]), truths(train, args.truth_column)) if has_truth else {}
        results["G2"] = g2(evaluation, truth_eval, generated["eval"]["lines"], fam, embedder, args.fine_keys,
                           habits) if has_truth else skipped(no_truth)  # fmt: skip
        bar.update()
        sources = {"none": None, "sft": canonical_attributes(generated["eval"]["texts"], args.attribute_keys)}
        if has_truth:  # what the generator knows, edited into its own lines (G4)

            def edit(g: dict, parts=EDITS) -> list:
                return [format_attributes(edit_line(line, habits, restored_keys(line, g["samples"][i]),
                                                    g["samples"][i], parts=parts), args.attribute_keys) or None
                        for i, line in enumerate(g["lines"])]  # fmt: skip

            def teach(g: dict, ds) -> list:
                return [
                    format_attributes(toward_teacher(line, taught, g["samples"][i]), args.attribute_keys) or None
                    for i, (line, taught) in enumerate(zip(g["lines"], ds[args.teacher_column], strict=True))
                ]

            read_as = {"eval": evaluation, "rl": rl}
            habit_edits = {name: edit(generated[name]) for name in read_as}
            teacher_edits = {name: teach(generated[name], ds) for name, ds in read_as.items()}
            edited, other, other_name = ((teacher_edits, habit_edits, HABITS) if args.headroom == "teacher"
                                         else (habit_edits, teacher_edits, TOWARD))  # fmt: skip
            sources.update(true=[format_attributes(t, args.attribute_keys) or None for t in truth_eval],
                           edited=edited["eval"])  # fmt: skip
            sources.update({f"edited: {part} only": edit(generated["eval"], (part,)) for part in EDITS})
            sources[f"edited: {other_name}"] = other["eval"]
        both = evaluate_attribute_sources(encoder, evaluation, sources, protocol="both_sides",
                                          batch_size=args.batch_size, show_progress=False)  # fmt: skip
        r1 = {name: r_at_1(m) for name, m in both.items()}
        results["G3"] = g3(r1)
        bar.update()
        if has_truth:
            parts_rl = {**{part: edit(generated["rl"], (part,)) for part in EDITS}, other_name: other["rl"]}
            results["G4"], results["G5"] = g4_g5(args, rl, gallery_rows, generated, edited["rl"], r1, habits, parts_rl)
        else:
            results["G4"] = results["G5"] = skipped(no_truth)
    bar.update(2 if args.generator else 4)

    # G6: stage 1's batches, and the step-0 encoder (the base it started from) for the cosine
    if has_truth and args.teacher_column in train.column_names:
        backbone = encoder.config.backbone
        base = args.encoder_base or config.get("model_name_or_path") or (backbone if backbone != "." else None)
        vectors = None
        if base:
            step0 = ProductEncoder.from_backbone(replace(encoder.config, backbone=resolve_model(base, args.cache_dir)))
            vectors = encode_catalog(step0, train, batch_size=args.batch_size, show_progress=False)
        fam_train = families(train["product_id"], truths(train, args.truth_column))
        results["G6"] = g6(g6_counts(train, fam_train, args, config, vectors))
    else:
        results["G6"] = skipped(no_truth if not has_truth else f"the catalog has no {args.teacher_column!r} column")
    bar.update()
    results["G7"] = g7(len(evaluation), pilot_differences(args.pilot or []))
    bar.update()
    bar.close()

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python recipes/preconditions.py " + " ".join(sys.argv[1:])
    record = {"command": command, "seconds": round(time.time() - started), "settings": asdict(args),
              "pass_lines": PASS_LINES, "gates": results}  # fmt: skip
    (out / "preconditions.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    page = "\n".join(["# Preconditions: can this catalog show the paper's gains?", "",
                      f"`{command}` ({record['seconds']} s). Catalog `{args.catalog}`, test split {args.eval_split!r} "
                      f"({len(evaluation):,} listings), RL split {args.rl_split!r}, encoder `{args.encoder}`, "
                      f"generator `{args.generator}`. R@1 in points; the pass lines are "
                      "`afmrl.preconditions.PASS_LINES`.", "", table(results), ""])  # fmt: skip
    (out / "preconditions.md").write_text(page, encoding="utf-8")
    print(page)
    return record


def cli(argv=None):
    random.seed(0)
    return run_cli(PreconditionsArguments, main, argv)


if __name__ == "__main__":
    cli()
