"""Attribute text: canonical formatting, a tolerant parser, SKU signatures and BM25.

AFMRL passes product attributes around as one line of text, ``key: value; key: value``, in a
fixed key order (the catalog's ``attributes`` objects are formatted this way, and the generator
is trained to write it). Three consumers read that text:

* the AGCL loss weighs negatives by BM25 between the attribute texts of two listings
  (``BM25Scorer``), with the IDF table built from the training set's attribute texts;
* the false-negative filter treats two listings with the same ``attribute_signature`` as the same
  SKU;
* the RAR rewards parse what the policy generated (``parse_attributes``). That text is arbitrary
  model output, so the parser never raises, runs in linear time and reports what it could not
  read instead of failing.

Normalisation (the same for formatting and parsing, and idempotent, so that
format -> parse -> format is a fixed point):

* fullwidth ASCII forms (``颜色：红色；``, common on Chinese marketplaces) fold to ASCII and control
  characters are dropped;
* keys and values are lower-cased: case says nothing about which product a listing is, and BM25
  needs exact token matches ("Red" must meet "red");
* keys: runs of whitespace, ``-``, ``_``, ``:``, ``;``, ``=`` become one ``_`` ("Secondary Color"
  -> ``secondary_color``), markdown/quote characters around them are stripped;
* values: whitespace collapses to one space; ``;`` (the pair separator) becomes ``,`` and ``{}``
  become ``()`` so a value can neither split a pair nor look like a JSON object; markdown/quote
  characters around them and a trailing ``.``/``,`` are stripped. ``:`` and ``=`` may stay in a
  value: a pair is split at the *first* separator and keys never contain one. These replacements
  are lossy on purpose: escaping would leak backslashes into BM25 tokens and into the prompt.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# A "key" longer than this is prose that happens to end in a colon ("Here are the attributes of the
# product: ..."), not an attribute name.
MAX_KEY_CHARS = 64
MAX_KEY_WORDS = 6
# Each failed JSON attempt may scan to the end of the text; capping attempts keeps parsing linear.
MAX_JSON_ATTEMPTS = 16

_FOLD = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}  # fullwidth ASCII -> ASCII
_FOLD[0x3000] = 0x20  # ideographic space
_FOLD.update({c: None for c in [*range(0x20), *range(0x7F, 0xA0)] if not chr(c).isspace()})
_KEY_SEPARATORS = re.compile(r"[\s\-_:;=]+")
_KEY_STRIP = "_*`\"'\u201c\u201d\u2018\u2019#>\u2022\u00b7+.,"
_QUOTES = " *`\"'\u201c\u201d\u2018\u2019"
_BULLET = re.compile(r"(?:[-*+>\u2022\u00b7]+|\d{1,3}[.)])\s+")
_WORD = re.compile(r"\w+")


def normalize_key(key: object) -> str:
    """Canonical form of an attribute name ('' when nothing is left)."""
    text = str(key).translate(_FOLD).lower().replace("{", "(").replace("}", ")")
    return _KEY_SEPARATORS.sub("_", text).strip(_KEY_STRIP)


def normalize_value(value: object) -> str:
    """Canonical form of an attribute value ('' when nothing is left)."""
    text = str(value).translate(_FOLD).lower().replace(";", ",").replace("{", "(").replace("}", ")")
    # rstrip first: lstrip can then only change the right end by emptying the string (idempotent).
    return " ".join(text.split()).rstrip(_QUOTES + ".,").lstrip(_QUOTES)


def _key_ok(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_CHARS and key.count("_") < MAX_KEY_WORDS


def _scalar(value: object) -> str | None:
    """JSON/Python scalars as text; None for null and containers (the caller reports them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


@dataclass(frozen=True)
class ParsedAttributes:
    """What ``parse_attributes`` read: normalised attributes and everything it could not use."""

    attributes: dict[str, str] = field(default_factory=dict)
    unparsed: list[str] = field(default_factory=list)
    duplicate_keys: list[str] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)

    @property
    def is_valid(self) -> bool:
        return bool(self.attributes)

    def to_text(self, key_order: Sequence[str] | None = None) -> str:
        return format_attributes(self.attributes, key_order)


class _Builder:
    """Collects pairs: first value of a key wins, later ones are reported as duplicates."""

    def __init__(self):
        self.attributes: dict[str, str] = {}
        self.unparsed: list[str] = []
        self.duplicates: list[str] = []

    def add(self, raw_key: object, raw_value: object, fragment: str) -> None:
        key, value = normalize_key(raw_key), normalize_value(raw_value)
        if not _key_ok(key) or not value:
            self.unparsed.append(fragment)
        elif key in self.attributes:
            if key not in self.duplicates:
                self.duplicates.append(key)
        else:
            self.attributes[key] = value

    def add_mapping(self, mapping: Mapping) -> None:
        for raw_key, raw_value in mapping.items():
            value = _scalar(raw_value)
            if value is None:
                try:
                    shown = json.dumps(raw_value, ensure_ascii=False)
                except Exception:  # unserialisable or too deep: still report the key
                    shown = "<unreadable>"
                self.unparsed.append(f"{raw_key}: {shown}")
            else:
                self.add(raw_key, value, f"{raw_key}: {value}")

    def add_lines(self, text: str) -> None:
        for line in text.splitlines():
            for piece in line.split(";"):
                fragment = piece.strip()
                if fragment.startswith("```"):  # code fence, possibly with a language tag
                    rest = fragment.lstrip("`").strip()
                    if len(rest.split()) <= 1:
                        continue
                    fragment = rest
                if not fragment:
                    continue
                bullet = _BULLET.match(fragment)
                body = fragment[bullet.end() :] if bullet else fragment
                cut = min((i for i in (body.find(":"), body.find("=")) if i >= 0), default=-1)
                if cut < 0:
                    self.unparsed.append(fragment)
                else:
                    self.add(body[:cut], body[cut + 1 :], fragment)


def _find_json_object(text: str) -> tuple[dict, int, int] | None:
    """First non-empty JSON object in ``text`` as (object, start, end); None if there is none."""
    decoder = json.JSONDecoder()
    start, attempts = text.find("{"), 0
    while start >= 0 and attempts < MAX_JSON_ATTEMPTS:
        attempts += 1
        try:
            obj, end = decoder.raw_decode(text, start)
        except Exception:  # ValueError, RecursionError on deep nesting, int-size limits
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict) and obj:  # "{}" is no answer; keep looking, else read lines
            return obj, start, end
        start = text.find("{", end)
    return None


def _report_prose(builder: _Builder, text: str) -> None:
    for line in text.splitlines():
        line = line.strip()
        if line and not (line.startswith("```") and len(line.lstrip("`").split()) <= 1):
            builder.unparsed.append(line)


def _parse(text: str | Mapping, known_keys: Collection[str] | None) -> ParsedAttributes:
    builder = _Builder()
    found = None if isinstance(text, Mapping) else _find_json_object(text)
    if isinstance(text, Mapping):
        builder.add_mapping(text)
    elif found is not None:
        obj, start, end = found
        # Prose and fences around the object are junk: report it, don't read pairs from it.
        _report_prose(builder, text[:start])
        builder.add_mapping(obj)
        _report_prose(builder, text[end:])
    else:
        builder.add_lines(text.translate(_FOLD))
    unknown = []
    if known_keys is not None:
        known = {normalize_key(k) for k in known_keys}
        unknown = [k for k in builder.attributes if k not in known]
    return ParsedAttributes(builder.attributes, builder.unparsed, builder.duplicates, unknown)


def parse_attributes(text: object, known_keys: Collection[str] | None = None) -> ParsedAttributes:
    """Read attributes from text; never raises (it runs inside the RL loop on model output).

    Accepts ``key: value; key: value``, one pair per line, ``key=value``, bullet or numbered
    lists, markdown bold keys, surrounding prose, and a JSON object anywhere in the text (also in
    a ```json fence). A mapping is read like a JSON object; None gives an empty result.
    Duplicate keys keep their first value. Keys not in ``known_keys`` are kept and listed in
    ``unknown_keys``. JSON null, nested objects and lists go to ``unparsed``.
    """
    try:
        if text is None:
            return ParsedAttributes()
        if isinstance(text, Mapping):
            return _parse(text, known_keys)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return _parse(str(text), known_keys)
    except Exception as exc:  # a bug here must cost a reward, not a training run
        return ParsedAttributes(unparsed=[f"<parser error {type(exc).__name__}>"])


def format_attributes(attributes: Mapping[str, object] | None, key_order: Sequence[str] | None = None) -> str:
    """Canonical one-line text ``key: value; key: value``.

    Keys in ``key_order`` come first in that order, the others follow sorted alphabetically.
    Keys and values are normalised (module docstring); pairs whose value is None or empty are
    skipped (a missing attribute). Raises ValueError on keys that normalise to nothing or look
    like prose, and TypeError on non-scalar values: this formats trusted data, so say so early.
    """
    pairs: dict[str, str] = {}
    for raw_key, raw_value in (attributes or {}).items():
        key = normalize_key(raw_key)
        if not _key_ok(key):
            raise ValueError(
                f"attribute key {raw_key!r} is empty or longer than "
                f"{MAX_KEY_CHARS} chars / {MAX_KEY_WORDS} words after normalisation"
            )
        if raw_value is None:
            continue
        scalar = _scalar(raw_value)
        if scalar is None:
            raise TypeError(f"attribute {raw_key!r} has a {type(raw_value).__name__} value; need str or number")
        value = normalize_value(scalar)
        if value and key not in pairs:
            pairs[key] = value
    order = list(dict.fromkeys(normalize_key(k) for k in key_order or ()))
    keys = [k for k in order if k in pairs] + sorted(k for k in pairs if k not in order)
    return "; ".join(f"{k}: {pairs[k]}" for k in keys)


def canonical_attributes(completions: Sequence[str], key_order: Sequence[str] | None = None) -> list[str | None]:
    """Parsed, canonical ``key: value; ...`` text per generated completion; None where nothing parses (the
    way the reward reads a generator's output, and every listing a generator annotates is embedded)."""
    return [parse_attributes(c).to_text(key_order) or None for c in completions]


def attribute_signature(attributes: Mapping[str, object] | str | None, keys: Sequence[str]) -> str:
    """Canonical text of ``attributes`` restricted to ``keys``, used as a SKU identity.

    Every key appears; a missing one is written ``key:`` with nothing after it, which no real
    value can produce (empty values are dropped), so {} and {"color": "red"} differ. Text is
    parsed first.
    """
    attrs = parse_attributes(attributes).attributes
    names = list(dict.fromkeys(normalize_key(k) for k in keys))
    return "; ".join(f"{k}: {attrs[k]}" if k in attrs else f"{k}:" for k in names)


def attribute_tokens(text: Mapping[str, object] | str | None) -> list[str]:
    """BM25 tokens of an attribute text: a pair token per pair plus the words of its value.

    ``color: dark red`` -> ``["color=dark red", "dark", "red"]``. The pair token is what tells
    ``color: red`` from ``secondary_color: red`` (near-duplicates often differ only there); the
    word tokens give partial credit for multi-word values ("brand new" vs "new"). Keys are not
    tokens on their own: nearly every listing has the same keys, so they would carry ~zero IDF
    and only inflate document lengths. Text that does not parse gives no tokens, so prose and
    junk can neither earn nor lose BM25 similarity.
    """
    tokens: list[str] = []
    for key, value in parse_attributes(text).attributes.items():
        tokens.append(f"{key}={value}")
        tokens.extend(_WORD.findall(value))
    return tokens


class BM25Scorer:
    """Okapi BM25 between attribute texts, with IDF and average length from a fixed corpus.

    IDF(t) = log(1 + (N - df + 0.5) / (df + 0.5)) (never negative; tokens unseen in the corpus get
    the df = 0 value). B_ij = sum over the *distinct* tokens t of query i of
    IDF(t) * tf(t, d_j) (k1 + 1) / (tf(t, d_j) + k1 (1 - b + b |d_j| / avgdl)).
    Query terms count once: a repeated word in a query (``red`` as color and secondary color) is
    one piece of evidence, and its frequency in the document already enters through tf.
    Picklable; ``to_dict``/``from_dict`` store the table as JSON next to a checkpoint.
    """

    def __init__(self, corpus: Iterable[str], k1: float = 1.2, b: float = 0.75):
        if not (k1 >= 0 and 0 <= b <= 1):
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b = float(k1), float(b)
        self.doc_freq: Counter[str] = Counter()
        self.num_docs, total = 0, 0
        for text in corpus:
            tokens = attribute_tokens(text)
            self.doc_freq.update(set(tokens))
            self.num_docs += 1
            total += len(tokens)
        self.avgdl = total / self.num_docs if total else 1.0  # guards empty corpora (no 0/0)

    def idf(self, token: str) -> float:
        df = self.doc_freq.get(token, 0)
        return math.log1p((self.num_docs - df + 0.5) / (df + 0.5))

    def score(self, queries: Sequence[str], documents: Sequence[str], normalize: str = "none") -> np.ndarray:
        """BM25 matrix (len(queries), len(documents)), float32.

        normalize="self" divides row i by query i's score against itself, the share of the query's
        own attribute evidence found in each document (about [0, 1]). Raw BM25 on attribute text
        is large (a listing scores ~27 against itself, ~13 against a near-duplicate, ~4 against an
        unrelated product on the embedded catalog), so tanh(B) in AGCL saturates at 1 for nearly
        every pair and the weighting becomes a constant; the normalised score keeps it graded.
        """
        if normalize not in ("none", "self"):
            raise ValueError(f"normalize must be 'none' or 'self', got {normalize!r}")
        query_tokens = [attribute_tokens(q) for q in queries]
        doc_tokens = query_tokens if documents is queries else [attribute_tokens(d) for d in documents]
        scores = self.score_tokens(query_tokens, doc_tokens)
        if normalize == "self":
            own = self.self_scores(query_tokens)
            scores = np.divide(scores, own[:, None], out=np.zeros_like(scores), where=own[:, None] > 0)
        return scores

    def self_scores(self, token_lists: Sequence[Sequence[str]]) -> np.ndarray:
        """Each tokenised text's BM25 score against itself (the diagonal of score_tokens(x, x))."""
        out = np.zeros(len(token_lists), dtype=np.float32)
        for i, tokens in enumerate(token_lists):
            if not tokens:
                continue
            terms, tf = np.unique(np.asarray(tokens, dtype=object), return_counts=True)
            norm = self.k1 * (1.0 - self.b + self.b * len(tokens) / self.avgdl)
            idf = np.array([self.idf(t) for t in terms])
            out[i] = float(np.sum(idf * tf * (self.k1 + 1.0) / (tf + norm)))
        return out

    def score_tokens(self, queries: Sequence[Sequence[str]], documents: Sequence[Sequence[str]]) -> np.ndarray:
        """``score`` on pre-tokenised texts; vectorised over all (query, document) pairs."""
        # Only query tokens can contribute, so the vocabulary is theirs; other document tokens
        # still count in |d_j|.
        vocab: dict[str, int] = {}
        q_rows, q_cols = [], []
        for i, tokens in enumerate(queries):
            for t in set(tokens):
                q_rows.append(i)
                q_cols.append(vocab.setdefault(t, len(vocab)))
        d_rows, d_cols = [], []
        lengths = np.zeros(len(documents), dtype=np.float64)
        for j, tokens in enumerate(documents):
            lengths[j] = len(tokens)
            for t in tokens:
                if t in vocab:
                    d_rows.append(j)
                    d_cols.append(vocab[t])
        size = len(vocab)  # may be 0 (all-empty queries): every shape below still works
        query_matrix = np.zeros((len(queries), size))
        query_matrix[q_rows, q_cols] = 1.0
        tf = (
            np.bincount(
                np.asarray(d_rows, dtype=np.int64) * size + np.asarray(d_cols, dtype=np.int64),
                minlength=len(documents) * size,
            )
            .reshape(len(documents), size)
            .astype(np.float64)
        )
        norm = self.k1 * (1.0 - self.b + self.b * lengths / self.avgdl)
        saturated = np.divide(tf * (self.k1 + 1.0), tf + norm[:, None], out=np.zeros_like(tf), where=tf > 0)
        idf = np.array([self.idf(t) for t in vocab])
        return ((query_matrix * idf) @ saturated.T).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "k1": self.k1,
            "b": self.b,
            "num_docs": self.num_docs,
            "avgdl": self.avgdl,
            "doc_freq": dict(self.doc_freq),
        }

    @classmethod
    def from_dict(cls, state: Mapping) -> BM25Scorer:
        scorer = cls([], k1=state["k1"], b=state["b"])
        scorer.num_docs, scorer.avgdl = int(state["num_docs"]), float(state["avgdl"])
        scorer.doc_freq = Counter({str(t): int(df) for t, df in state["doc_freq"].items()})
        return scorer
