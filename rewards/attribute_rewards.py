"""Rewards on the *form* of generated attributes: format, conciseness, F1 against a reference.

These sit beside ``RetrievalRankReward`` (the reward that says whether the attributes make
retrieval better) and shape what it cannot see: that the output is one clean ``key: value; ...``
line the encoder and BM25 can read, that it stays short, and, where the catalog has reference
attributes, that it agrees with them.

Every reward here is a plain class in TRL's style: an instance is a callable with a ``__name__``
(TRL logs ``rewards/<__name__>/mean`` and ``/std``), it pickles, and it is never an ``nn.Module``
(TRL would treat that as a reward *model*). It is called as::

    reward(prompts=..., completions=..., completion_ids=..., <one keyword list per dataset column>,
           trainer_state=..., log_metric=..., log_extra=...) -> list[float | None]

``completions`` may be strings or message lists (``[{"role": "assistant", "content": ...}]``) whose
content is a string, a list of blocks (``[{"type": "text", "text": ...}]``) or None. The rewards
never raise on model output and never return NaN or infinity; ``None`` means "not applicable to
this sample" (TRL turns it into NaN and leaves the sample out of that reward's mean).

Attribute text is read with :func:`afmrl.attributes.parse_attributes` (tolerant; keys and values
normalised: lower case, ``Secondary Color`` -> ``secondary_color``, fullwidth punctuation folded).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence

from afmrl.attributes import ParsedAttributes, normalize_key, parse_attributes

__all__ = [
    "INVALID_REWARD",
    "AttributeF1Reward",
    "AttributeFormatReward",
    "ConcisenessReward",
    "completion_text",
    "parse_completion",
]


def completion_text(completion: object) -> str:
    """The text of one completion, whatever shape TRL or a caller gives it; never raises.

    A string is returned as is. A message list joins the text of its assistant messages' contents
    (of all messages when none is the assistant's): string content, or the ``text`` of
    ``{"type": "text"}`` blocks; image blocks and None are skipped.
    A single message dict or block list is read the same way. Anything else becomes ``""``.
    """
    try:
        return _text(completion, depth=0)
    except Exception:  # defensive: a reward must cost nothing but its own value
        return ""


def _text(obj: object, depth: int) -> str:
    if isinstance(obj, str):
        return obj
    if obj is None or depth > 4:
        return ""
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if isinstance(obj, Mapping):
        if "content" in obj:  # a message
            return _text(obj.get("content"), depth + 1)
        if "text" in obj:  # a text block
            text = obj.get("text")
            return text if isinstance(text, str) else ""
        return ""  # an image block, or something unknown
    if isinstance(obj, Sequence):
        messages = [m for m in obj if isinstance(m, Mapping) and "role" in m]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        if assistant and len(messages) == len(obj):  # a conversation: read the assistant's turns
            obj = assistant
        parts = [_text(item, depth + 1) for item in obj]
        return "\n".join(part for part in parts if part)
    return ""


def parse_completion(completion: object, known_keys: Collection[str] | None = None) -> tuple[str, ParsedAttributes]:
    """``(text, parse_attributes(text, known_keys))`` for one completion of any shape."""
    text = completion_text(completion)
    return text, parse_attributes(text, known_keys)


def _finite(value: float, fallback: float = 0.0) -> float:
    value = float(value)
    return value if math.isfinite(value) else float(fallback)


def _log(log_metric: Callable | None, name: str, values: Sequence[float]) -> None:
    """Mean of ``values`` through TRL's ``log_metric`` kwarg (absent when called by hand)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if callable(log_metric) and values:
        log_metric(name, float(sum(values) / len(values)))


INVALID_REWARD = -0.1  # the paper's eta: unparsable output sits below the [0, 1] of every readable line


def _below_valid(reward: str, value: float) -> float:
    """``invalid_reward`` checked to sit strictly below every valid score, 0 here: a readable line that scores 0 must
    never rank below junk in a GRPO group."""
    value = _check_number("invalid_reward", value)
    if value >= 0:
        raise ValueError(
            f"{reward}: invalid_reward={value!r} would not sit below every valid reward (valid rewards reach 0): "
            f"use a negative value, e.g. the default {INVALID_REWARD}"
        )
    return value


def _check_number(name: str, value: float, low: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or (low is not None and number < low):
        bound = f" and >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be finite{bound}, got {value!r}")
    return number


class AttributeFormatReward:
    """How cleanly a completion follows the canonical ``key: value; key: value`` line.

    Scale, in [0, 1] for readable output::

        r = clip(1 - p_canon - p_junk - p_unknown - p_dup, 0, 1)

        p_canon   = noncanonical_penalty (0.1)  if the stripped text is not exactly the canonical
                    line of what was parsed ("; ".join(f"{k}: {v}") with normalised keys and values,
                    in the order written), else 0. Capitals, JSON, one pair per line, bullets,
                    extra spaces or any junk all make a text non-canonical.
        p_junk    = junk_penalty (0.5) * (characters in fragments the parser could not read)
                                       / (characters of the stripped text)
        p_unknown = unknown_key_penalty (0.5) * (#keys not in known_keys) / (#keys parsed)
                    (0 when known_keys is None: every key is allowed)
        p_dup     = duplicate_penalty (0.5) * (#keys written more than once) / (#distinct keys)

    Output with no readable pair at all (empty, None, prose, a JSON list) scores ``invalid_reward`` (default
    -0.1, below every readable line: a value of 0 or more is refused). So ``color: red; size: m`` -> 1.0,
    ``Color: Red; size: M`` -> 0.9, ``color: red; color: blue`` -> 1 - 0.1 - 0.5 = 0.4.

    Logs ``attribute_format/valid_fraction`` (share of completions with at least one pair) through
    TRL's ``log_metric`` when it is given.
    """

    __name__ = "attribute_format"

    def __init__(
        self,
        known_keys: Collection[str] | None = None,
        noncanonical_penalty: float = 0.1,
        junk_penalty: float = 0.5,
        unknown_key_penalty: float = 0.5,
        duplicate_penalty: float = 0.5,
        invalid_reward: float = INVALID_REWARD,
    ):
        if isinstance(known_keys, str):
            raise TypeError("known_keys must be a collection of key names, not one string")
        self.known_keys = None if known_keys is None else tuple(dict.fromkeys(normalize_key(k) for k in known_keys))
        self.noncanonical_penalty = _check_number("noncanonical_penalty", noncanonical_penalty, 0.0)
        self.junk_penalty = _check_number("junk_penalty", junk_penalty, 0.0)
        self.unknown_key_penalty = _check_number("unknown_key_penalty", unknown_key_penalty, 0.0)
        self.duplicate_penalty = _check_number("duplicate_penalty", duplicate_penalty, 0.0)
        self.invalid_reward = _below_valid(self.__name__, invalid_reward)

    def score(self, completion: object) -> float:
        """The reward of one completion (see the class docstring)."""
        return self._score(*parse_completion(completion, self.known_keys))

    def _score(self, text: str, parsed: ParsedAttributes) -> float:
        try:
            if not parsed.attributes:
                return self.invalid_reward
            stripped = text.strip()
            canonical = "; ".join(f"{k}: {v}" for k, v in parsed.attributes.items())
            penalty = 0.0 if stripped == canonical and not parsed.duplicate_keys else self.noncanonical_penalty
            junk_chars = sum(len(fragment) for fragment in parsed.unparsed)
            penalty += self.junk_penalty * min(1.0, junk_chars / max(1, len(stripped)))
            penalty += self.unknown_key_penalty * len(parsed.unknown_keys) / len(parsed.attributes)
            penalty += self.duplicate_penalty * min(1.0, len(parsed.duplicate_keys) / len(parsed.attributes))
            return _finite(min(1.0, max(0.0, 1.0 - penalty)), self.invalid_reward)
        except Exception:  # pragma: no cover - parse_attributes never raises; belt and braces
            return self.invalid_reward

    def __call__(self, completions, log_metric=None, **kwargs) -> list[float]:
        parsed = [parse_completion(c, self.known_keys) for c in completions]
        _log(log_metric, "attribute_format/valid_fraction", [float(bool(p.attributes)) for _, p in parsed])
        return [self._score(text, p) for text, p in parsed]

    def __repr__(self) -> str:
        return (
            f"AttributeFormatReward(known_keys={self.known_keys}, noncanonical_penalty={self.noncanonical_penalty}, "
            f"junk_penalty={self.junk_penalty}, unknown_key_penalty={self.unknown_key_penalty}, "
            f"duplicate_penalty={self.duplicate_penalty}, invalid_reward={self.invalid_reward})"
        )


class ConcisenessReward:
    """Explicit, tunable pressure towards short attribute lists.

    The paper observes generated attribute lists getting shorter under RL as only the
    discriminative attributes survive; this reward makes that pressure explicit instead of leaving
    it to the retrieval reward. With n = number of distinct attributes parsed and c = characters
    of the stripped completion (junk included: it is length too)::

        r = clip(1 - penalty_per_extra * max(0, n - target_attributes)
                   - length_weight * max(0, c - char_budget) / char_budget, 0, 1)

    Lists of up to ``target_attributes`` pairs within ``char_budget`` characters score 1.0; fewer
    attributes are *not* rewarded further (informativeness is the retrieval reward's job).
    ``max_attributes`` (optional) is a hard cap: more than that many pairs scores 0.0. Output
    with no readable pair scores ``invalid_reward`` (default -0.1, below the bottom of the scale, so
    emptiness never beats a long but valid list). ``length_weight=0`` or ``char_budget=None``
    turns the character term off; ``penalty_per_extra=0`` the count term.

    Defaults: target 4, 0.1 per extra attribute, 0.5 per budget's worth of characters over a
    budget of 120 (about 4-5 short pairs). E.g. 6 pairs in 80 chars -> 1 - 0.2 = 0.8.

    Logs ``conciseness/num_attributes`` and ``conciseness/num_chars`` (batch means; watch them for
    collapse) through TRL's ``log_metric`` when it is given.
    """

    __name__ = "conciseness"

    def __init__(
        self,
        target_attributes: int = 4,
        max_attributes: int | None = None,
        penalty_per_extra: float = 0.1,
        length_weight: float = 0.5,
        char_budget: int | None = 120,
        invalid_reward: float = INVALID_REWARD,
    ):
        self.target_attributes = int(_check_number("target_attributes", target_attributes, 0.0))
        if max_attributes is not None:
            max_attributes = int(_check_number("max_attributes", max_attributes, 1.0))
            if max_attributes < self.target_attributes:
                raise ValueError(
                    f"max_attributes ({max_attributes}) must be >= target_attributes ({self.target_attributes})"
                )
        self.max_attributes = max_attributes
        self.penalty_per_extra = _check_number("penalty_per_extra", penalty_per_extra, 0.0)
        self.length_weight = _check_number("length_weight", length_weight, 0.0)
        if char_budget is not None:
            char_budget = int(_check_number("char_budget", char_budget, 1.0))
        self.char_budget = char_budget
        self.invalid_reward = _below_valid(self.__name__, invalid_reward)

    @staticmethod
    def _measure(completion: object) -> tuple[int, int]:
        """(number of distinct attributes parsed, characters of the stripped text)."""
        text, parsed = parse_completion(completion)
        return len(parsed.attributes), len(text.strip())

    def score(self, completion: object) -> float:
        """The reward of one completion (see the class docstring)."""
        return self._score(*self._measure(completion))

    def _score(self, n: int, chars: int) -> float:
        if n == 0:
            return self.invalid_reward
        if self.max_attributes is not None and n > self.max_attributes:
            return 0.0
        r = 1.0 - self.penalty_per_extra * max(0, n - self.target_attributes)
        if self.char_budget is not None:
            r -= self.length_weight * max(0, chars - self.char_budget) / self.char_budget
        return _finite(min(1.0, max(0.0, r)))

    def __call__(self, completions, log_metric=None, **kwargs) -> list[float]:
        measured = [self._measure(c) for c in completions]
        _log(log_metric, "conciseness/num_attributes", [float(n) for n, _ in measured])
        _log(log_metric, "conciseness/num_chars", [float(c) for _, c in measured])
        return [self._score(n, chars) for n, chars in measured]

    def __repr__(self) -> str:
        return (
            f"ConcisenessReward(target_attributes={self.target_attributes}, max_attributes={self.max_attributes}, "
            f"penalty_per_extra={self.penalty_per_extra}, length_weight={self.length_weight}, "
            f"char_budget={self.char_budget}, invalid_reward={self.invalid_reward})"
        )


class AttributeF1Reward:
    """F1 between the generated (key, value) pairs and the row's reference attributes.

    The reference arrives as the dataset column ``reference_column`` (default ``attributes``), a
    keyword list with one entry per completion: a mapping, an attribute text, or None. Both sides
    are parsed and normalised by :mod:`afmrl.attributes` (case, spacing, key separators), and a
    pair matches only when key *and* value are equal::

        P = predicted pairs, R = reference pairs
        precision = |P & R| / |P|, recall = |P & R| / |R|, F1 = 2 p r / (p + r)  (0 when P & R is empty)

    ``score="precision"`` rewards the precision instead: no penalty for leaving a key out, only for
    stating a value the reference contradicts or lacks. Beside the retrieval reward it anchors RL to
    the reference without fixing the list's length (the paper sees RL shorten the lists);
    ``score="recall"`` is the other half.

    ``ignore_keys`` drops keys from both sides first (e.g. ``condition``, ``shipping`` on a catalog
    whose reference lists non-discriminative keys). A row with no usable reference (None, empty,
    unreadable, or the column absent -- the last with one warning) gives None: "not applicable",
    left out of the mean.
    Output with no readable pair against a real reference scores ``invalid_reward`` (default -0.1, below any F1).
    Logs ``attribute_f1/precision`` and ``attribute_f1/recall`` (means over applicable rows).
    """

    __name__ = "attribute_f1"

    SCORES = ("f1", "precision", "recall")

    def __init__(
        self,
        reference_column: str = "attributes",
        ignore_keys: Collection[str] = (),
        invalid_reward: float = INVALID_REWARD,
        score: str = "f1",
    ):
        if score not in self.SCORES:
            raise ValueError(f"attribute_f1: score must be one of {self.SCORES}, got {score!r}")
        if not isinstance(reference_column, str) or not reference_column:
            raise TypeError(f"reference_column must be a column name, got {reference_column!r}")
        if isinstance(ignore_keys, str):
            raise TypeError("ignore_keys must be a collection of key names, not one string")
        self.reference_column = reference_column
        self.ignore_keys = tuple(dict.fromkeys(normalize_key(k) for k in ignore_keys))
        self.invalid_reward = _below_valid(self.__name__, invalid_reward)
        self.score = score
        self._warned = False

    def _pairs(self, parsed: ParsedAttributes) -> set[tuple[str, str]]:
        return {(k, v) for k, v in parsed.attributes.items() if k not in self.ignore_keys}

    def precision_recall_f1(self, completion: object, reference: object) -> tuple[float, float, float] | None:
        """``(precision, recall, F1)`` of one completion, or None when the reference is unusable."""
        scored = self._evaluate(completion, reference)
        return None if scored is None else scored[:3]

    def _evaluate(self, completion: object, reference: object) -> tuple[float, float, float, float] | None:
        """(precision, recall, F1, the reward under ``score``), or None when the reference is unusable."""
        try:
            truth = self._pairs(parse_attributes(reference))
            if not truth:
                return None
            predicted = self._pairs(parse_completion(completion)[1])
            if not predicted:
                return 0.0, 0.0, self.invalid_reward, self.invalid_reward
            hits = len(predicted & truth)
            precision, recall = hits / len(predicted), hits / len(truth)
            f1 = _finite(2 * precision * recall / (precision + recall) if hits else 0.0)
            return precision, recall, f1, {"f1": f1, "precision": precision, "recall": recall}[self.score]
        except Exception:
            return None

    def __call__(self, completions, log_metric=None, **kwargs) -> list[float | None]:
        references = self._references(kwargs.get(self.reference_column), len(completions))
        scores = [self._evaluate(c, ref) for c, ref in zip(completions, references, strict=True)]
        _log(log_metric, "attribute_f1/precision", [s[0] for s in scores if s is not None])
        _log(log_metric, "attribute_f1/recall", [s[1] for s in scores if s is not None])
        return [None if s is None else s[3] for s in scores]

    def _references(self, column: object, n: int) -> list:
        """The reference column as a list of n entries; n Nones (with one warning) if it is unusable."""
        problem = None
        if column is None:
            problem = "is not among the reward's keyword arguments (the dataset has no such column)"
        elif isinstance(column, str | bytes | Mapping) or not isinstance(column, Sequence):
            problem = f"should be a list with one entry per completion, got a {type(column).__name__}"
        elif len(column) != n:
            problem = f"has {len(column)} entries for {n} completions"
        if problem is None:
            return list(column)
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"attribute_f1: reference column {self.reference_column!r} {problem}; "
                "the reward returns None (not applicable) for these samples.",
                stacklevel=3,
            )
        return [None] * n

    def __repr__(self) -> str:
        return (
            f"AttributeF1Reward(reference_column={self.reference_column!r}, ignore_keys={self.ignore_keys}, "
            f"invalid_reward={self.invalid_reward}, score={self.score!r})"
        )
