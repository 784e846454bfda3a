"""Loss terms against independent computations (docs/losses.md).

Two kinds of check for every term: a reference written in plain Python (lists, loops,
``math.exp`` / ``math.log``, nothing shared with the implementation), and, for several terms,
2x2 cases worked out by hand. Then the structural promises the trainer relies on: which embeddings
a term reads and trains, its errors, and its invariances.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from kd_trainer.losses import (
    TERMS,
    Features,
    UnknownTermError,
    available_terms,
    compute_term,
    get_term,
    register_term,
)

EMBEDDINGS = ("student_image", "student_text", "teacher_image", "teacher_text")
STUDENT = {"student_image", "student_text"}
E = math.e

# --------------------------------------------------------------------------------------------
# A reference in plain Python. Matrices are lists of rows.
# --------------------------------------------------------------------------------------------


def r_unit(rows: list[list[float]]) -> list[list[float]]:
    out = []
    for row in rows:
        norm = math.sqrt(sum(x * x for x in row))
        out.append([x / norm for x in row])
    return out


def r_dots(xs: list[list[float]], ys: list[list[float]]) -> list[list[float]]:
    return [[sum(a * b for a, b in zip(x, y)) for y in ys] for x in xs]


def r_logits(xs, ys, tau):
    return [[v / tau for v in row] for row in r_dots(xs, ys)]


def r_lse(row: list[float]) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def r_prob(xs, ys, tau):
    """P(X, Y; tau), row by row."""
    out = []
    for row in r_logits(xs, ys, tau):
        z = sum(math.exp(v) for v in row)
        out.append([math.exp(v) / z for v in row])
    return out


def r_ce(logits) -> float:
    """CE(L, arange(B))."""
    n = len(logits)
    return sum(r_lse(logits[i]) - logits[i][i] for i in range(n)) / n


def r_sce(logits, target) -> float:
    n = len(logits)
    total = 0.0
    for i in range(n):
        lse = r_lse(logits[i])
        for j in range(len(logits[i])):
            total -= target[i][j] * (logits[i][j] - lse)
    return total / n


def r_kl(p, q) -> float:
    n = len(p)
    total = 0.0
    for i in range(n):
        for j in range(len(p[i])):
            total += p[i][j] * (math.log(p[i][j]) - math.log(q[i][j]))
    return total / n


def r_mse(a, b) -> float:
    diffs = [(x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(diffs) / len(diffs)


def r_side(side: str, image: Callable[[], float], text: Callable[[], float], both: str = "mean") -> float:
    if side == "image":
        return image()
    if side == "text":
        return text()
    return (image() + text()) / (2 if both == "mean" else 1)


def r_sdm(vs, ts, pids, tau, **_):
    n = len(pids)
    q = [[(1.0 if pids[i] == pids[j] else 0.0) for j in range(n)] for i in range(n)]
    q = [[x / sum(row) for x in row] for row in q]

    def kl_to_q(p):
        return sum(p[i][j] * (math.log(p[i][j]) - math.log(q[i][j] + 1e-8)) for i in range(n) for j in range(n)) / n

    return kl_to_q(r_prob(vs, ts, tau)) + kl_to_q(r_prob(ts, vs, tau))


def r_crd(vs, ts, vt, tt, tau, teacher_temperature=None, **_):
    tt_ = tau if teacher_temperature is None else teacher_temperature
    return 0.5 * (
        r_kl(r_prob(vt, tt, tt_), r_prob(vs, ts, tau)) + r_kl(r_prob(tt, vt, tt_), r_prob(ts, vs, tau))
    )


# name -> reference(vs, ts, vt, tt, pids, tau, side, **kwargs), inputs already unit rows.
REFERENCE: dict[str, Callable[..., float]] = {
    "itc": lambda vs, ts, vt, tt, pids, tau, side: 0.5 * (r_ce(r_logits(vs, ts, tau)) + r_ce(r_logits(ts, vs, tau))),
    "ss_itc": lambda vs, ts, vt, tt, pids, tau, side: REFERENCE["itc"](vs, ts, vt, tt, pids, tau, side),
    "st_itc": lambda vs, ts, vt, tt, pids, tau, side: 0.5 * (r_ce(r_logits(vs, tt, tau)) + r_ce(r_logits(tt, vs, tau))),
    "ts_itc": lambda vs, ts, vt, tt, pids, tau, side: 0.5 * (r_ce(r_logits(vt, ts, tau)) + r_ce(r_logits(ts, vt, tau))),
    "sdm": lambda vs, ts, vt, tt, pids, tau, side: r_sdm(vs, ts, pids, tau),
    "cross_kd": lambda vs, ts, vt, tt, pids, tau, side: tau**2
    / 2
    * (r_sce(r_logits(ts, vs, tau), r_prob(tt, vt, tau)) + r_sce(r_logits(vs, ts, tau), r_prob(vt, tt, tau))),
    "cross_kl": lambda vs, ts, vt, tt, pids, tau, side: tau**2
    / 2
    * (r_kl(r_prob(tt, vt, tau), r_prob(ts, vs, tau)) + r_kl(r_prob(vt, tt, tau), r_prob(vs, ts, tau))),
    "cross_rkl": lambda vs, ts, vt, tt, pids, tau, side: tau**2
    / 2
    * (r_kl(r_prob(ts, vs, tau), r_prob(tt, vt, tau)) + r_kl(r_prob(vs, ts, tau), r_prob(vt, tt, tau))),
    "motis": lambda vs, ts, vt, tt, pids, tau, side: r_side(
        side, lambda: r_ce(r_logits(vs, vt, tau)), lambda: r_ce(r_logits(ts, tt, tau))
    ),
    "inter_ts_kl": lambda vs, ts, vt, tt, pids, tau, side: r_side(
        side,
        lambda: r_kl(r_prob(vs, tt, tau), r_prob(vt, tt, tau)),
        lambda: r_kl(r_prob(ts, vt, tau), r_prob(tt, vt, tau)),
    ),
    "inter_ss_kl": lambda vs, ts, vt, tt, pids, tau, side: r_kl(r_prob(ts, vs, tau), r_prob(tt, vt, tau))
    + r_kl(r_prob(vs, ts, tau), r_prob(vt, tt, tau)),
    "inter_ts_sym_kl": lambda vs, ts, vt, tt, pids, tau, side: r_kl(r_prob(ts, vt, tau), r_prob(vs, tt, tau))
    + r_kl(r_prob(vs, tt, tau), r_prob(ts, vt, tau)),
    "intra_ss_sd": lambda vs, ts, vt, tt, pids, tau, side: r_side(
        side, lambda: r_mse(r_dots(vs, vs), r_dots(vt, vt)), lambda: r_mse(r_dots(ts, ts), r_dots(tt, tt))
    ),
    "intra_ts_sd": lambda vs, ts, vt, tt, pids, tau, side: r_side(
        side, lambda: r_mse(r_dots(vs, vt), r_dots(vt, vt)), lambda: r_mse(r_dots(ts, tt), r_dots(tt, tt))
    ),
    "intra_ts_sym_sd": lambda vs, ts, vt, tt, pids, tau, side: r_mse(r_dots(ts, tt), r_dots(vs, vt)),
    "inter_ss_sd": lambda vs, ts, vt, tt, pids, tau, side: 0.5
    * (r_mse(r_dots(ts, vs), r_dots(tt, vt)) + r_mse(r_dots(vs, ts), r_dots(vt, tt))),
    "inter_ts_sd": lambda vs, ts, vt, tt, pids, tau, side: r_side(
        side, lambda: r_mse(r_dots(vs, tt), r_dots(vt, tt)), lambda: r_mse(r_dots(ts, vt), r_dots(tt, vt))
    ),
    "fd": lambda vs, ts, vt, tt, pids, tau, side: r_side(side, lambda: r_mse(vs, vt), lambda: r_mse(ts, tt), "sum"),
    "icl": lambda vs, ts, vt, tt, pids, tau, side: r_side(
        side, lambda: r_ce(r_logits(vs, tt, tau)), lambda: r_ce(r_logits(ts, vt, tau))
    ),
    "crd": lambda vs, ts, vt, tt, pids, tau, side, **kw: r_crd(vs, ts, vt, tt, tau, **kw),
    "affinity": lambda vs, ts, vt, tt, pids, tau, side: 0.5
    * (r_sce(r_logits(vs, ts, tau), r_prob(vt, tt, tau)) + r_sce(r_logits(ts, vs, tau), r_prob(tt, vt, tau))),
}

ALL_CASES = [(name, side) for name in sorted(TERMS) for side in TERMS[name].sides]


def random_features(b: int = 5, d: int = 4, *, seed: int = 0, dtype=torch.float64, pids=None, grad=False) -> Features:
    g = torch.Generator().manual_seed(seed)
    embeddings = {t: torch.randn(b, d, generator=g, dtype=dtype) * 3 for t in EMBEDDINGS}
    if grad:
        embeddings = {t: x.requires_grad_() for t, x in embeddings.items()}
    if pids is None:
        pids = torch.tensor([i // 2 for i in range(b)])  # pairs share an identity
    return Features(**embeddings, pids=pids)


def reference_value(name: str, f: Features, tau: float, side: str, **kwargs) -> float:
    vs, ts, vt, tt = (r_unit(getattr(f, t).tolist()) for t in EMBEDDINGS)
    return REFERENCE[name](vs, ts, vt, tt, f.pids.tolist(), tau, side, **kwargs)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def test_every_registered_term_has_a_reference():
    assert set(REFERENCE) == set(available_terms())


@pytest.mark.parametrize("name,side", ALL_CASES)
@pytest.mark.parametrize("tau", [0.3, 0.05])
def test_matches_plain_python_reference(name: str, side: str, tau: float):
    f = random_features(seed=zlib.crc32(f"{name}/{side}".encode()) % 1000)
    got = compute_term(name, f, temperature=tau, side=side)
    assert got.dim() == 0
    assert got.item() == pytest.approx(reference_value(name, f, tau, side), rel=1e-9, abs=1e-12)


def test_crd_teacher_temperature():
    f = random_features(seed=3)
    got = compute_term("crd", f, temperature=0.2, teacher_temperature=0.7)
    assert got.item() == pytest.approx(reference_value("crd", f, 0.2, "both", teacher_temperature=0.7), rel=1e-9)
    differs = compute_term("crd", f, temperature=0.2)
    assert differs.item() != pytest.approx(got.item())


def feats(**rows: list[list[float]]) -> Features:
    return Features(**{k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()})


def test_hand_itc():
    # Rows normalise to vs = [[1,0],[0,1]], ts = [[1,0],[.6,.8]]: vs ts^T = [[1,.6],[0,.8]].
    f = feats(student_image=[[2.0, 0.0], [0.0, 3.0]], student_text=[[5.0, 0.0], [3.0, 4.0]])
    # image->text rows: logits (1, .6) and (0, .8); text->image rows: (1, 0) and (.6, .8).
    i2t = (math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(-0.8))) / 2
    t2i = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.2))) / 2
    for name in ("itc", "ss_itc"):
        assert compute_term(name, f, temperature=1.0).item() == pytest.approx((i2t + t2i) / 2, rel=1e-12)


def test_hand_motis():
    # vs vt^T = [[1, .6], [0, .8]] at T = 1; only the image side.
    f = feats(student_image=[[1.0, 0.0], [0.0, 1.0]], teacher_image=[[1.0, 0.0], [0.6, 0.8]])
    want = (math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(-0.8))) / 2
    assert compute_term("motis", f, temperature=1.0, side="image").item() == pytest.approx(want, rel=1e-12)


def test_hand_fd():
    # vs row 0 normalises to (.6, .8) against (1, 0): squared errors .16 + .64; row 1 exact.
    f = feats(
        student_image=[[3.0, 4.0], [0.0, 1.0]],
        teacher_image=[[1.0, 0.0], [0.0, 2.0]],
        student_text=[[1.0, 1.0], [0.0, 5.0]],
        teacher_text=[[2.0, 2.0], [0.0, 1.0]],
    )
    assert compute_term("fd", f, side="image").item() == pytest.approx(0.8 / 4, rel=1e-12)
    assert compute_term("fd", f, side="text").item() == pytest.approx(0.0, abs=1e-15)
    assert compute_term("fd", f).item() == pytest.approx(0.2, rel=1e-12)  # a sum, not a mean


def test_hand_intra_ss_sd():
    # vs vs^T = [[1, .6], [.6, 1]] against vt vt^T = I: (0 + .36 + .36 + 0) / 4.
    f = feats(student_image=[[1.0, 0.0], [0.6, 0.8]], teacher_image=[[1.0, 0.0], [0.0, 1.0]])
    assert compute_term("intra_ss_sd", f, side="image").item() == pytest.approx(0.18, rel=1e-12)


def test_hand_cross_kl():
    # Teacher: orthogonal rows, so at T = 1 each row is (a, b) = (e, 1) / (e + 1).
    # Student: identical rows, so its rows are uniform (.5, .5). Both directions alike.
    f = feats(
        student_image=[[1.0, 0.0], [1.0, 0.0]],
        student_text=[[1.0, 0.0], [1.0, 0.0]],
        teacher_image=[[1.0, 0.0], [0.0, 1.0]],
        teacher_text=[[1.0, 0.0], [0.0, 1.0]],
    )
    a, b = E / (E + 1), 1 / (E + 1)
    want = a * math.log(2 * a) + b * math.log(2 * b)  # T^2/2 * (2 * the same KL)
    assert compute_term("cross_kl", f, temperature=1.0).item() == pytest.approx(want, rel=1e-12)


def test_hand_sdm():
    # All pids equal and all cosines equal: q = P = 1/2 everywhere; only the 1e-8 remains.
    f = feats(student_image=[[1.0, 0.0], [2.0, 0.0]], student_text=[[3.0, 0.0], [1.0, 0.0]])
    f.pids = torch.tensor([7, 7])
    want = -2 * math.log(1 + 2e-8)
    assert compute_term("sdm", f, temperature=1.0).item() == pytest.approx(want, rel=1e-9)

    # Distinct pids, v = t = I at tau = 1: each row (a, b) = (e, 1) / (e + 1) against q = I.
    f = feats(student_image=[[1.0, 0.0], [0.0, 1.0]], student_text=[[1.0, 0.0], [0.0, 1.0]])
    f.pids = torch.tensor([0, 1])
    a, b = E / (E + 1), 1 / (E + 1)
    row = a * (math.log(a) - math.log(1 + 1e-8)) + b * (math.log(b) - math.log(1e-8))
    assert compute_term("sdm", f, temperature=1.0).item() == pytest.approx(2 * row, rel=1e-12)


def test_itc_equals_cross_entropy_reference():
    f = random_features(b=7, d=6, seed=11)
    tau = 0.02
    v = f.student_image / f.student_image.norm(dim=1, keepdim=True)
    t = f.student_text / f.student_text.norm(dim=1, keepdim=True)
    labels = torch.arange(7)
    want = (F.cross_entropy(v @ t.T / tau, labels) + F.cross_entropy(t @ v.T / tau, labels)) / 2
    torch.testing.assert_close(compute_term("itc", f), want)  # default temperature is 0.02


def test_sdm_with_distinct_pids_is_kl_to_identity():
    f = random_features(b=6, seed=12, pids=torch.arange(6))
    tau = 0.1
    v = F.normalize(f.student_image, dim=1)
    t = F.normalize(f.student_text, dim=1)
    log_q = torch.log(torch.eye(6, dtype=torch.float64) + 1e-8)

    def kl_to_identity(logits):
        prob = torch.softmax(logits, dim=1)
        return (prob * (torch.log_softmax(logits, dim=1) - log_q)).sum(1).mean()

    want = kl_to_identity(v @ t.T / tau) + kl_to_identity(t @ v.T / tau)
    torch.testing.assert_close(compute_term("sdm", f, temperature=tau), want)


# --------------------------------------------------------------------------------------------
# Student equal to teacher
# --------------------------------------------------------------------------------------------

ZERO_AT_TEACHER = {
    "cross_kl", "cross_rkl", "inter_ts_kl", "inter_ss_kl", "crd",
    "intra_ss_sd", "intra_ts_sd", "inter_ss_sd", "inter_ts_sd", "fd",
}  # fmt: skip
# Soft cross-entropy = H(P) + KL(P || Q): not zero, but minimal, at the teacher.
MINIMAL_AT_TEACHER = {"cross_kd", "affinity"}


def student_is_teacher(seed: int) -> Features:
    f = random_features(seed=seed)
    vs = f.teacher_image.clone().requires_grad_()
    ts = f.teacher_text.clone().requires_grad_()
    return Features(vs, ts, f.teacher_image, f.teacher_text, f.pids)


@pytest.mark.parametrize("name,side", [c for c in ALL_CASES if c[0] in ZERO_AT_TEACHER])
def test_zero_when_student_equals_teacher(name: str, side: str):
    f = student_is_teacher(seed=5)
    value = compute_term(name, f, side=side)
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    value.backward()
    for x in (f.student_image, f.student_text):
        assert x.grad is None or x.grad.abs().max() < 1e-10


@pytest.mark.parametrize("name", sorted(MINIMAL_AT_TEACHER))
def test_minimal_when_student_equals_teacher(name: str):
    f = student_is_teacher(seed=6)
    value = compute_term(name, f)
    assert value.item() > 0
    value.backward()
    assert f.student_image.grad.abs().max() < 1e-10 and f.student_text.grad.abs().max() < 1e-10
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        moved = Features(
            f.student_image.detach() + 0.1 * torch.randn(f.student_image.shape, generator=g, dtype=torch.float64),
            f.student_text.detach() + 0.1 * torch.randn(f.student_text.shape, generator=g, dtype=torch.float64),
            f.teacher_image,
            f.teacher_text,
        )
        assert compute_term(name, moved).item() > value.item()


@pytest.mark.parametrize("name", ["inter_ts_sym_kl", "intra_ts_sym_sd"])
def test_cross_tower_terms_vanish_only_when_all_four_agree(name: str):
    # With vs = vt and ts = tt these compare the teacher's image and text structure: not zero.
    assert compute_term(name, student_is_teacher(seed=7)).item() > 1e-4
    x = torch.randn(5, 4, dtype=torch.float64)
    assert compute_term(name, Features(x, x, x, x)).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Embeddings read and trained
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,side", ALL_CASES)
def test_gradients_reach_exactly_the_trained_embeddings(name: str, side: str):
    spec = get_term(name)
    f = random_features(seed=8, grad=True)
    compute_term(name, f, side=side).backward()
    trained = spec.trains(side)
    assert trained <= spec.embeddings(side) and trained <= STUDENT
    for name in EMBEDDINGS:
        grad = getattr(f, name).grad
        if name in trained:
            assert grad is not None and grad.abs().max() > 1e-8, f"{name} gets no gradient"
        else:
            assert grad is None or not grad.any(), f"{name} gets a gradient"


@pytest.mark.parametrize("name,side", ALL_CASES)
def test_declared_embeddings_suffice(name: str, side: str):
    spec = get_term(name)
    full = random_features(seed=9)
    only = Features(**{t: getattr(full, t) for t in spec.embeddings(side)}, pids=full.pids)
    torch.testing.assert_close(compute_term(name, only, side=side), compute_term(name, full, side=side))


def test_spec_flags():
    direct = {n for n, s in TERMS.items() if s.direct_compare}
    assert direct == {
        "fd", "motis", "icl", "st_itc", "ts_itc",
        "inter_ts_kl", "inter_ts_sym_kl", "intra_ts_sd", "intra_ts_sym_sd", "inter_ts_sd",
    }  # fmt: skip
    assert {n for n, s in TERMS.items() if not s.batch_dependent} == {"fd"}
    assert {n for n, s in TERMS.items() if not s.needs_teacher} == {"itc", "ss_itc", "sdm"}
    assert available_terms("task") == ["itc", "sdm", "ss_itc", "st_itc", "ts_itc"]
    assert all(TERMS[n].default_temperature == 0.02 for n in available_terms("task"))
    assert all(TERMS[n].default_temperature == 0.5 for n in available_terms("distill"))
    assert set(available_terms("task")) | set(available_terms("distill")) == set(available_terms())
    assert TERMS["itc"].fn is TERMS["ss_itc"].fn
    assert TERMS["motis"].embeddings("both") == {"student_image", "teacher_image", "student_text", "teacher_text"}
    assert TERMS["st_itc"].trains("both") == {"student_image"}


def test_batch_dependence():
    f = random_features(b=4, seed=10)
    for name, spec in TERMS.items():
        whole = compute_term(name, f).item()
        singles = [
            compute_term(name, Features(**{t: getattr(f, t)[i : i + 1] for t in EMBEDDINGS},
                                        pids=f.pids[i : i + 1])).item()
            for i in range(4)
        ]
        if spec.batch_dependent:
            assert whole != pytest.approx(sum(singles) / 4), name
        else:
            assert whole == pytest.approx(sum(singles) / 4, rel=1e-12), name


def test_default_temperature_is_used():
    f = random_features(seed=4)
    for name, spec in TERMS.items():
        torch.testing.assert_close(
            compute_term(name, f), compute_term(name, f, temperature=spec.default_temperature)
        )


# --------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,side", ALL_CASES)
def test_finite_differentiable_and_scale_invariant(name: str, side: str):
    f = random_features(b=8, d=16, seed=13, dtype=torch.float32, grad=True)
    value = compute_term(name, f, side=side)
    assert torch.isfinite(value)
    value.backward()
    for t in EMBEDDINGS:
        grad = getattr(f, t).grad
        assert grad is None or torch.isfinite(grad).all()

    g = torch.Generator().manual_seed(2)
    f64 = random_features(seed=14)
    scaled = Features(
        **{t: getattr(f64, t) * torch.empty(5, 1, dtype=torch.float64).uniform_(0.1, 10, generator=g)
           for t in EMBEDDINGS},
        pids=f64.pids,
    )
    torch.testing.assert_close(compute_term(name, scaled, side=side), compute_term(name, f64, side=side))


def test_half_precision_inputs_are_computed_in_float32():
    f = random_features(seed=15, dtype=torch.bfloat16)
    for name in TERMS:
        value = compute_term(name, f)
        assert value.dtype == torch.float32 and torch.isfinite(value)


# --------------------------------------------------------------------------------------------
# Errors and the registry
# --------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(UnknownTermError) as info:
        get_term("motsi")
    message = str(info.value)
    assert "did you mean 'motis'" in message
    assert ", ".join(sorted(TERMS)) in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(KeyError, match="Valid terms"):
        compute_term("kl", random_features())


def test_invalid_side():
    with pytest.raises(ValueError, match=r"term 'itc' has no side 'image'; allowed sides: both"):
        compute_term("itc", random_features(), side="image")
    with pytest.raises(ValueError, match="allowed sides: image, text, both"):
        get_term("motis").embeddings("left")


def test_missing_features():
    f = random_features()
    f.teacher_text = None
    with pytest.raises(ValueError, match=r"term 'motis' \(side=text\) needs teacher_text embeddings"):
        compute_term("motis", f, side="text")
    compute_term("motis", f, side="image")  # the image side does not read it
    f.pids = None
    with pytest.raises(ValueError, match="needs pids"):
        compute_term("sdm", f)
    with pytest.raises(ValueError, match="student_image and student_text"):
        compute_term("itc", Features())


def test_shape_errors():
    f = random_features()
    f.teacher_image = torch.randn(5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="project the student"):
        compute_term("fd", f, side="image")
    f = random_features()
    f.student_text = f.student_text[:3]
    with pytest.raises(ValueError, match="batch sizes"):
        compute_term("itc", f)


def test_bad_arguments():
    f = random_features()
    with pytest.raises(ValueError, match=r"unexpected arguments \['teacher_temperature'\]"):
        compute_term("motis", f, teacher_temperature=0.1)
    with pytest.raises(ValueError, match="positive"):
        compute_term("motis", f, temperature=0.0)


def test_registry_is_read_only_and_names_unique():
    with pytest.raises(TypeError):
        TERMS["mine"] = TERMS["itc"]  # type: ignore[index]
    with pytest.raises(ValueError, match="already registered"):
        register_term("itc", kind="task", reads={"both": ("student_image",)})(lambda f, **kw: f)
    with pytest.raises(ValueError, match="kind"):
        register_term("new_term", kind="other", reads={"both": ()})
    with pytest.raises(ValueError, match="kind"):
        available_terms("other")
    assert "new_term" not in TERMS


def test_register_term_checks_the_embeddings_it_reads():
    with pytest.raises(ValueError, match=r"term 'new_term': unknown embeddings \['student_audio'\]; the embeddings "
                                         r"are \['student_image', 'student_text', 'teacher_image', 'teacher_text'\]"):
        register_term("new_term", kind="task", reads={"both": ("student_image", "student_audio")})
    with pytest.raises(ValueError, match=r"term 'new_term': no embeddings given for side 'text'"):
        register_term("new_term", kind="distill", sides=("image", "text"), reads={"image": ("teacher_image",)})
    with pytest.raises(ValueError, match=r"needs_teacher=False but its embeddings say True"):
        register_term("new_term", kind="distill", reads={"both": ("student_image", "teacher_image")},
                      needs_teacher=False)
    assert "new_term" not in TERMS
