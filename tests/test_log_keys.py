"""kd_trainer.log_keys: the one definition of the keys the trainers log and the report reads.

The expected keys are written out literally, as they appear in a run's trainer_state.json, so a
change of format on either side fails here.
"""

from __future__ import annotations

import pytest

from kd_trainer.log_keys import (
    MIMIC_TOTAL_KEY,
    MimicKey,
    TermKey,
    hybrid_key,
    mimic_key,
    mimic_weighted_key,
    parse_hybrid_key,
    parse_mimic_key,
    parse_term_key,
    stage_key,
    term_key,
)


@pytest.mark.parametrize("term, weighted, stage, key", [
    ("itc", False, None, "loss_itc"),
    ("itc", True, None, "loss_itc_weighted"),
    ("motis[image]", False, "image", "image/loss_motis[image]"),
    ("inter_ss_kl", True, "joint", "joint/loss_inter_ss_kl_weighted"),
])
def test_term_keys_round_trip(term: str, weighted: bool, stage: str | None, key: str) -> None:
    assert term_key(term, weighted=weighted, stage=stage) == key
    assert parse_term_key(key) == TermKey(term=term, weighted=weighted, stage=stage)


@pytest.mark.parametrize("key, parsed", [
    ("mimic/job0/teacher0/mse", MimicKey("job0", "teacher0", "mse")),
    ("mimic/job0/teacher1/kl/3", MimicKey("job0", "teacher1", "kl", pair=3)),
    ("mimic/job0/weighted", MimicKey("job0", weighted=True)),
    ("mimic/total", MimicKey(None, weighted=True)),
])
def test_mimic_keys_round_trip(key: str, parsed: MimicKey) -> None:
    assert parse_mimic_key(key) == parsed
    assert parse_term_key(key) is None  # never mistaken for a loss term
    if parsed.is_total:
        assert key == MIMIC_TOTAL_KEY
    elif parsed.teacher is None:
        assert mimic_weighted_key(parsed.job) == key
    else:
        assert mimic_key(parsed.job, parsed.teacher, parsed.loss, parsed.pair) == key


@pytest.mark.parametrize("key", ["loss", "learning_rate", "image/alpha", "eval_r1", "loss_", "stage",
                                 "mimic/job0", "mimic/job0/teacher0/mse/x", "mimic//weighted"])
def test_other_keys_are_neither(key: str) -> None:
    assert parse_term_key(key) is None and parse_mimic_key(key) is None


def test_a_stage_named_mimic_stays_a_stage() -> None:
    assert parse_term_key("mimic/loss_itc") == TermKey("itc", False, "mimic")
    assert stage_key("alpha", "image") == "image/alpha" and stage_key("alpha", None) == "alpha"


def test_hybrid_keys() -> None:
    assert hybrid_key("text", "r1") == "eval_hybrid_text_r1"
    assert hybrid_key("image", "mAP", prefix="test") == "test_hybrid_image_mAP"
    assert parse_hybrid_key("eval_hybrid_image_mINP") == ("image", "mINP")
    assert parse_hybrid_key("hybrid_text_r5", prefix="") == ("text", "r5")
    assert parse_hybrid_key("eval_r1") is None and parse_hybrid_key("test_hybrid_text_r1") is None


def test_bad_names_are_refused_with_what_was_expected() -> None:
    with pytest.raises(ValueError, match="contain no '/'"):
        term_key("a/b")
    with pytest.raises(ValueError, match="mimic teacher name"):
        mimic_key("job0", "", "mse")
    with pytest.raises(ValueError, match="alphanumeric"):
        hybrid_key("image_1", "r1")
