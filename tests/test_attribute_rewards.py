"""Format, conciseness and reference-F1 rewards: exact values, robustness, shapes, pickling."""

import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afmrl.embedded.synthetic_catalog import ATTRIBUTE_KEYS
from rewards import AttributeF1Reward, AttributeFormatReward, ConcisenessReward, completion_text


def as_message(text):
    return [{"role": "assistant", "content": text}]


def as_blocks(text):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


class Recorder:
    """Stands in for TRL's log_metric."""

    def __init__(self):
        self.metrics = {}

    def __call__(self, name, value):
        self.metrics.setdefault(name, []).append(value)


# ---------------------------------------------------------------- completion_text


def test_completion_text_shapes():
    assert completion_text("color: red") == "color: red"
    assert completion_text(as_message("color: red")) == "color: red"
    assert completion_text(as_blocks("color: red")) == "color: red"
    assert completion_text(as_message(None)) == ""
    assert completion_text(None) == ""
    assert completion_text(42) == ""
    image_and_text = [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "a: b"}]}]
    assert completion_text(image_and_text) == "a: b"
    conversation = [{"role": "user", "content": "describe"}, {"role": "assistant", "content": "color: red"}]
    assert completion_text(conversation) == "color: red"


# ---------------------------------------------------------------- attribute_format


@pytest.mark.parametrize(
    "text, expected",
    [
        ("color: red; size: m", 1.0),
        ("  color: red; size: m\n", 1.0),  # surrounding whitespace is not junk
        ("Color: Red; size: M", 0.9),  # readable, not canonical
        ('{"color": "red", "size": "m"}', 0.9),  # JSON
        ("- color: red\n- size: m", 0.9),  # a bullet list
        ("color: red; color: blue", 1 - 0.1 - 0.5),  # 1 duplicated key of 1
        ("color: red; size: m; color: blue", 1 - 0.1 - 0.25),  # 1 duplicated key of 2
        ("color: red; size: m; thanks!", 1 - 0.1 - 0.5 * 7 / 28),  # 7 junk chars of 28
        ("color: red; weight: 3kg", 1 - 0.1 * 0 - 0.5 * 1 / 2),  # 1 unknown key of 2 (canonical)
        ("", -0.1),  # no readable pair: invalid, below every readable line
        ("I cannot tell from the picture.", -0.1),
        ("Sure! Here are the attributes of the product in the image: color: red", -0.1),
    ],
)
def test_attribute_format_values(text, expected):
    reward = AttributeFormatReward(known_keys=ATTRIBUTE_KEYS)
    assert reward.score(text) == pytest.approx(expected)
    assert reward(completions=[text]) == [pytest.approx(expected)]


def test_attribute_format_any_key_without_vocabulary_and_invalid_reward():
    assert AttributeFormatReward().score("weight: 3kg; material: steel") == 1.0
    strict = AttributeFormatReward(known_keys=["color"], invalid_reward=-0.1)
    assert strict.score("weight: 3kg") == 0.5
    assert strict.score(None) == -0.1
    assert strict.score(as_message(None)) == -0.1


def test_attribute_format_logs_valid_fraction():
    log = Recorder()
    AttributeFormatReward()(completions=["color: red", "nothing here", "size: m", ""], log_metric=log)
    assert log.metrics == {"attribute_format/valid_fraction": [0.5]}


def test_attribute_format_rejects_bad_arguments():
    with pytest.raises(TypeError):
        AttributeFormatReward(known_keys="color")
    with pytest.raises(ValueError):
        AttributeFormatReward(junk_penalty=-1)
    with pytest.raises(ValueError):
        AttributeFormatReward(invalid_reward=float("nan"))


@pytest.mark.parametrize("cls", [AttributeFormatReward, ConcisenessReward, AttributeF1Reward])
def test_invalid_output_scores_below_every_valid_output(cls):
    """Every readable line scores at least 0, so junk must score below 0: a value of 0 or more is refused."""
    reward = cls()
    worst_valid = {
        AttributeFormatReward: "a: 1; a: 2; " + "!" * 300,  # duplicated key, mostly junk: clipped to 0
        ConcisenessReward: "; ".join(f"k{i}: " + "v" * 30 for i in range(40)),  # far over both budgets, clipped to 0
        AttributeF1Reward: "color: blue",  # no pair right: F1 0
    }[cls]
    kwargs = {"attributes": [{"color": "red"}] * 2} if cls is AttributeF1Reward else {}
    valid, junk = reward(completions=[worst_valid, "no pair here"], **kwargs)
    assert valid == 0.0 and junk == -0.1 < valid
    with pytest.raises(ValueError, match="would not sit below every valid reward"):
        cls(invalid_reward=0.0)


# ---------------------------------------------------------------- conciseness


@pytest.mark.parametrize(
    "text, expected",
    [
        ("color: red", 1.0),
        ("color: red; size: m; logo: star; pattern: solid", 1.0),  # exactly the target
        ("a: 1; b: 2; c: 3; d: 4; e: 5; f: 6", 1 - 2 * 0.1),  # 2 extra, 34 chars
        ("color: " + "x" * 173, 1 - 0.5 * (180 - 120) / 120),  # 1 pair, 180 chars
        ("", -0.1),
        ("no pairs at all", -0.1),
    ],
)
def test_conciseness_values(text, expected):
    reward = ConcisenessReward()
    assert reward.score(text) == pytest.approx(expected)
    assert reward(completions=[as_message(text)]) == [pytest.approx(expected)]


def test_conciseness_knobs():
    six = "a: 1; b: 2; c: 3; d: 4; e: 5; f: 6"
    assert ConcisenessReward(target_attributes=2, penalty_per_extra=0.25).score(six) == 0.0  # clipped at 0
    assert ConcisenessReward(target_attributes=5, max_attributes=5).score(six) == 0.0  # hard cap
    assert ConcisenessReward(target_attributes=5, max_attributes=6).score(six) == pytest.approx(0.9)
    assert ConcisenessReward(char_budget=10, length_weight=0.1).score("abc: " + "x" * 15) == pytest.approx(0.9)
    assert ConcisenessReward(char_budget=None).score("abc: " + "x" * 500) == 1.0
    assert ConcisenessReward(invalid_reward=-1).score("nope") == -1.0
    with pytest.raises(ValueError):
        ConcisenessReward(target_attributes=4, max_attributes=3)


def test_conciseness_logs_length():
    log = Recorder()
    ConcisenessReward()(completions=["a: 1; b: 2", "c: 3"], log_metric=log)
    assert log.metrics == {"conciseness/num_attributes": [1.5], "conciseness/num_chars": [7.0]}


# ---------------------------------------------------------------- attribute_f1


def test_attribute_f1_values():
    reward = AttributeF1Reward()
    reference = {"color": "Red", "Size": "M", "logo": "star"}
    completions = [
        "color: red; size: m; logo: star",  # all 3: F1 1
        "Color: RED",  # p=1, r=1/3 -> 0.5
        "color: red; size: l; brand: acme; logo: star",  # 2 hits, p=2/4, r=2/3 -> 4/7
        "color: blue",  # no hit -> 0
        "nothing parsable",  # invalid -> -0.1, below a wrong line
        "color: red",  # reference None -> not applicable
        "color: red",  # empty reference -> not applicable
        "color: red",  # reference as attribute text
    ]
    references = [reference] * 5 + [None, {}, "color: red; size: m"]
    log = Recorder()
    out = reward(completions=[as_blocks(c) for c in completions], attributes=references, log_metric=log)
    assert out[:5] == [pytest.approx(1.0), pytest.approx(0.5), pytest.approx(4 / 7), 0.0, -0.1]
    assert out[5] is None and out[6] is None
    assert out[7] == pytest.approx(2 / 3)
    assert set(log.metrics) == {"attribute_f1/precision", "attribute_f1/recall"}
    assert log.metrics["attribute_f1/precision"][0] == pytest.approx((1 + 1 + 0.5 + 0 + 0 + 1) / 6)


def test_attribute_f1_precision_and_recall_scores():
    reference = {"color": "red", "size": "m", "logo": "star"}
    completions = [
        "color: red",
        "color: red; size: l; brand: acme; logo: star",
        "color: blue",
        "nothing parsable",
        "color: red",
    ]
    kwargs = {"completions": completions, "attributes": [reference] * 4 + [None]}
    precision = AttributeF1Reward(score="precision", invalid_reward=-0.2)(**kwargs)
    recall = AttributeF1Reward(score="recall", invalid_reward=-0.2)(**kwargs)
    # Leaving keys out costs recall only; a wrong or extra pair costs precision; unreadable stays invalid.
    assert precision[:4] == [pytest.approx(1.0), pytest.approx(2 / 4), 0.0, -0.2] and precision[4] is None
    assert recall[:4] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 0.0, -0.2] and recall[4] is None
    with pytest.raises(ValueError, match="score"):
        AttributeF1Reward(score="accuracy")


def test_attribute_f1_column_and_ignored_keys():
    reward = AttributeF1Reward(reference_column="true_attributes", ignore_keys=["Condition"])
    out = reward(completions=["color: red; condition: new"], true_attributes=[{"color": "red", "condition": "used"}])
    assert out == [1.0]
    with pytest.warns(UserWarning, match="true_attributes"):
        assert reward(completions=["color: red", "x: y"], attributes=[{"color": "red"}] * 2) == [None, None]
    assert AttributeF1Reward(invalid_reward=-0.5)(completions=[""], attributes=[{"a": "b"}]) == [-0.5]


# ---------------------------------------------------------------- robustness and shapes

REWARDS = [
    AttributeFormatReward(known_keys=ATTRIBUTE_KEYS),
    AttributeFormatReward(invalid_reward=-0.1),
    ConcisenessReward(),
    ConcisenessReward(target_attributes=1, max_attributes=2, char_budget=5),
    AttributeF1Reward(),
]

_block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=200)}),
    st.fixed_dictionaries({"type": st.just("image")}),
    st.dictionaries(st.text(max_size=5), st.one_of(st.none(), st.integers(), st.text(max_size=20)), max_size=3),
)
_content = st.one_of(st.none(), st.text(max_size=300), st.lists(_block, max_size=3), st.integers())
_message = st.fixed_dictionaries({"role": st.just("assistant"), "content": _content})
_attr_text = st.lists(
    st.tuples(st.sampled_from([*ATTRIBUTE_KEYS, "Color", "weight", "", "a b c d e f g h"]), st.text(max_size=15)),
    max_size=6,
).map(lambda pairs: "; ".join(f"{k}: {v}" for k, v in pairs))
_completion = st.one_of(
    st.text(max_size=400),
    _attr_text,
    _attr_text.map(lambda t: f"```json\n{{{t}}}\n``` trailing"),
    st.lists(_message, max_size=2),
    st.none(),
    st.binary(max_size=50),
)
_reference = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(ATTRIBUTE_KEYS), st.text(max_size=10), max_size=4),
    st.text(max_size=100),
)


@settings(max_examples=200, deadline=None)
@given(completions=st.lists(_completion, min_size=1, max_size=4), data=st.data())
def test_rewards_never_raise_and_are_finite(completions, data):
    references = data.draw(st.lists(_reference, min_size=len(completions), max_size=len(completions)))
    log = Recorder()
    for reward in REWARDS:
        out = reward(
            prompts=[None] * len(completions),
            completions=completions,
            attributes=references,
            log_metric=log,
            trainer_state=None,
        )
        assert len(out) == len(completions)
        for value in out:
            assert value is None or (isinstance(value, float) and math.isfinite(value))
            if not isinstance(reward, AttributeF1Reward):
                assert value is not None
    assert all(math.isfinite(v) for values in log.metrics.values() for v in values)


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(st.text(max_size=200), _attr_text), reference=_reference)
def test_message_lists_equal_strings(text, reference):
    for reward in REWARDS:
        shapes = [[text], [as_message(text)], [as_blocks(text)]]
        outs = [reward(completions=c, attributes=[reference]) for c in shapes]
        assert outs[0] == outs[1] == outs[2]


def test_pickle_round_trip_and_names():
    for reward in REWARDS:
        clone = pickle.loads(pickle.dumps(reward))
        assert type(clone) is type(reward) and vars(clone) == vars(reward)
        texts = ["color: red; size: m", "junk", "COLOR: Blue; x: 1; y: 2; z: 3; w: 4"]
        refs = [{"color": "red"}] * 3
        assert clone(completions=texts, attributes=refs) == reward(completions=texts, attributes=refs)
    assert [r.__name__ for r in REWARDS[::2]] == ["attribute_format", "conciseness", "attribute_f1"]
    import torch

    assert not any(isinstance(r, torch.nn.Module) for r in REWARDS)
