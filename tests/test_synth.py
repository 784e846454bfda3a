"""SynthPEDES: the generated files follow the CUHK-PEDES layout, draw what the captions say, and are reproducible."""

from __future__ import annotations

import collections
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd_trainer.data import load_pedes
from kd_trainer.synthetic.pedes import (
    COLOUR_RGB,
    COLOUR_WORDS,
    META_FILE,
    make_synth_pedes,
    sample_identities,
)

REPO = Path(__file__).resolve().parents[1]
N_IDS = 30
SIZE = (96, 48)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset shared by the read-only tests; the folder name is the one load_pedes expects."""
    return make_synth_pedes(tmp_path_factory.mktemp("root") / "SynthPEDES", num_identities=N_IDS,
                            image_size=SIZE, seed=0)


def _records(root: Path) -> list[dict]:
    return json.loads((root / "reid_raw.json").read_text())


def _pixels(root: Path, rec: dict) -> np.ndarray:
    with Image.open(root / "imgs" / rec["file_path"]) as im:
        return np.asarray(im.convert("RGB"))


def test_records_have_the_cuhk_pedes_keys_and_real_images(synth: Path) -> None:
    records = _records(synth)
    assert isinstance(records, list) and len(records) >= 3 * N_IDS
    assert {r["id"] for r in records} == set(range(1, N_IDS + 1))  # 1-based, none missing
    for r in records:
        assert set(r) == {"split", "captions", "file_path", "processed_tokens", "id"}
        assert r["split"] in ("train", "val", "test") and type(r["id"]) is int
        assert len(r["captions"]) == 2 and all(isinstance(c, str) and c for c in r["captions"])
        assert r["processed_tokens"] == [c.lower().replace(".", " ").replace(",", " ").split()
                                         for c in r["captions"]]
        with Image.open(synth / "imgs" / r["file_path"]) as im:
            assert im.mode == "RGB" and im.size == (SIZE[1], SIZE[0])  # PIL reports (W, H)
    per_id = collections.Counter(r["id"] for r in records)
    assert set(per_id.values()) <= {3, 4, 5}
    assert len({r["file_path"] for r in records}) == len(records)


def test_splits_are_by_identity_and_follow_the_fractions(synth: Path) -> None:
    ids: dict[str, set[int]] = collections.defaultdict(set)
    for r in _records(synth):
        ids[r["split"]].add(r["id"])
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"].isdisjoint(ids["test"])
    assert ids["val"].isdisjoint(ids["test"])
    assert [len(ids[s]) for s in ("train", "val", "test")] == [21, 4, 5] or \
        [len(ids[s]) for s in ("train", "val", "test")] == [21, 5, 4]
    # Train ids come first, as in CUHK-PEDES, so ``id - 1`` is already contiguous.
    assert ids["train"] == set(range(1, len(ids["train"]) + 1))


def test_splits_of_a_tiny_dataset_are_all_non_empty(tmp_path: Path) -> None:
    root = make_synth_pedes(tmp_path / "s", num_identities=3, images_per_identity=(1, 1), seed=2)
    assert sorted(r["split"] for r in _records(root)) == ["test", "train", "val"]


def test_loads_with_the_synth_pedes_loader(synth: Path) -> None:
    dsd = load_pedes("synth_pedes", synth.parent)
    records = _records(synth)
    n_train_images = sum(r["split"] == "train" for r in records)
    assert len(dsd["train"]) == 2 * n_train_images  # one row per (image, caption)


def test_same_seed_is_identical_and_another_seed_differs(tmp_path: Path) -> None:
    kw = dict(num_identities=6, images_per_identity=(2, 3), image_size=(64, 32))
    a = make_synth_pedes(tmp_path / "a", seed=5, **kw)
    b = make_synth_pedes(tmp_path / "b", seed=5, **kw)
    c = make_synth_pedes(tmp_path / "c", seed=6, **kw)
    assert (a / "reid_raw.json").read_bytes() == (b / "reid_raw.json").read_bytes()
    ra = _records(a)
    for rec in ra:
        assert np.array_equal(_pixels(a, rec), _pixels(b, rec))
    assert (a / "reid_raw.json").read_bytes() != (c / "reid_raw.json").read_bytes()
    rc = _records(c)
    assert any(not np.array_equal(_pixels(a, x), _pixels(c, y)) for x, y in zip(ra, rc) if
               x["file_path"] == y["file_path"])


def test_identities_share_attributes_but_full_descriptions_are_unique() -> None:
    people = sample_identities(400, seed=0)
    assert len({p.key() for p in people}) == 400
    # Limited palettes: many identities share their upper garment's type and colour.
    shared = collections.Counter((p.upper_type, p.upper_colour) for p in people)
    assert max(shared.values()) >= 5
    assert sample_identities(50, seed=0) == people[:50]  # the ones make_synth_pedes draws, pid = index + 1



def test_a_disjoint_corpus_shares_no_person_with_the_target(tmp_path: Path) -> None:
    target = {p.key() for p in sample_identities(400, seed=0)}
    # Without the exclusion, a 3000-person corpus of another seed does draw some target people.
    assert target & {p.key() for p in sample_identities(3000, seed=1)}
    corpus = sample_identities(3000, seed=1, exclude=frozenset(target))
    assert len({p.key() for p in corpus}) == 3000 and not target & {p.key() for p in corpus}
    # make_synth_pedes draws the same people, records the exclusion, and refuses a folder written without it.
    kw = dict(num_identities=40, images_per_identity=(1, 1), image_size=(32, 16), seed=1)
    root = make_synth_pedes(tmp_path / "c", **kw, disjoint_from=(400, 0))
    assert json.loads((root / META_FILE).read_text())["disjoint_from"] == [400, 0]
    assert len(_records(root)) == 40
    with pytest.raises(ValueError, match=r"disjoint_from"):
        make_synth_pedes(root, **kw)


def _nearest(rgb: np.ndarray, names: list[str]) -> str:
    palette = np.array([COLOUR_RGB[n] for n in names], dtype=float)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def test_torso_shows_the_upper_garment_colour(synth: Path) -> None:
    people = sample_identities(N_IDS, seed=0)
    upper_names = sorted({p.upper_colour for p in people})
    votes: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in _records(synth):
        p = people[r["id"] - 1]
        if p.upper_pattern != "plain" or p.bag_type == "backpack":  # stripes and backpacks cover the torso
            continue
        px = _pixels(synth, r).astype(float)
        h, w, _ = px.shape
        # Wherever the person stands, scale and position keep the mid-chest inside this patch.
        patch = px[int(0.30 * h):int(0.42 * h), int(0.40 * w):int(0.60 * w)].reshape(-1, 3)
        votes[r["id"]][_nearest(np.median(patch, axis=0), upper_names)] += 1
    dominant = {pid: c.most_common(1)[0][0] for pid, c in votes.items()}
    assert len(dominant) >= 8
    hits = [dominant[pid] == people[pid - 1].upper_colour for pid in dominant]
    assert np.mean(hits) >= 0.8
    # Identities whose garments differ in colour look different where the garment is.
    pairs = [(a, b) for a in dominant for b in dominant if a < b
             and people[a - 1].upper_colour != people[b - 1].upper_colour]
    assert np.mean([dominant[a] != dominant[b] for a, b in pairs]) >= 0.8


def test_captions_name_the_upper_colour_and_vary(synth: Path) -> None:
    people = sample_identities(N_IDS, seed=0)
    records = _records(synth)
    mentioned = []
    for r in records:
        words = COLOUR_WORDS[people[r["id"] - 1].upper_colour]
        mentioned.append(any(w in c.lower() for c in r["captions"] for w in words))
    assert np.mean(mentioned) >= 0.9
    captions = [c for r in records for c in r["captions"]]
    assert len(set(captions)) >= 0.9 * len(captions)  # templates, synonyms and order make repeats rare
    gendered = {"man": (" he ", " his "), "woman": (" she ", " her ")}
    for r in records:
        p = people[r["id"] - 1]
        wrong = gendered["woman" if p.gender == "man" else "man"]
        assert not any(w in f" {c.lower()} " for c in r["captions"] for w in wrong)
    # Some captions are partial: much shorter than the identity's other captions.
    lengths = [len(c.split()) for c in captions]
    assert min(lengths) <= 8 and max(lengths) >= 25


def test_same_arguments_reuse_the_folder_without_drawing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kd_trainer.synthetic.pedes as synth_mod

    kw = dict(num_identities=4, images_per_identity=(1, 2), image_size=(32, 16), seed=1)
    root = make_synth_pedes(tmp_path / "s", **kw)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    def boom(*a, **k):  # pragma: no cover - only runs if the cache is ignored
        raise AssertionError("regenerated although the arguments match")

    monkeypatch.setattr(synth_mod, "_render", boom)
    # Lists as a YAML recipe gives them must count as the same arguments.
    assert make_synth_pedes(tmp_path / "s", **{**kw, "image_size": [32, 16]}) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps


def test_other_arguments_raise_naming_them_unless_overwrite(tmp_path: Path) -> None:
    kw = dict(num_identities=4, images_per_identity=(1, 1), image_size=(32, 16), seed=1)
    root = make_synth_pedes(tmp_path / "s", **kw)
    with pytest.raises(ValueError, match=r"num_identities.*overwrite"):
        make_synth_pedes(root, **{**kw, "num_identities": 5})
    with pytest.raises(ValueError, match=r"image_size") as err:
        make_synth_pedes(root, **{**kw, "image_size": (48, 24)})
    assert "seed" not in str(err.value)
    make_synth_pedes(root, **{**kw, "num_identities": 3}, overwrite=True)
    assert {r["id"] for r in _records(root)} == {1, 2, 3}
    assert len(list((root / "imgs" / "synth").iterdir())) == 3  # no stale images of the larger run
    assert json.loads((root / META_FILE).read_text())["num_identities"] == 3


def test_a_foreign_annotation_file_is_never_overwritten_silently(tmp_path: Path) -> None:
    (tmp_path / "reid_raw.json").write_text("[]")
    with pytest.raises(ValueError, match="overwrite"):
        make_synth_pedes(tmp_path, num_identities=3)
    assert (tmp_path / "reid_raw.json").read_text() == "[]"


@pytest.mark.parametrize("bad", [dict(num_identities=0), dict(images_per_identity=(3, 2)),
                                 dict(image_size=(8, 4)), dict(split_identities=(0.5, 0.2, 0.2))])
def test_invalid_arguments_are_rejected(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_synth_pedes(tmp_path / "s", **bad)


def test_cli_writes_the_dataset_and_reports_it(tmp_path: Path) -> None:
    out = tmp_path / "SynthPEDES"
    cmd = [sys.executable, str(REPO / "data_scripts" / "make_synth_pedes.py"), "--out", str(out),
           "--identities", "5", "--height", "40", "--width", "20", "--seed", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "5 identities" in done.stdout and len(done.stdout.strip().splitlines()) == 1
    records = _records(out)
    assert {r["id"] for r in records} == set(range(1, 6))
    with Image.open(out / "imgs" / records[0]["file_path"]) as im:
        assert im.size == (20, 40)


def test_cli_refuses_other_arguments_with_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # In-process: a second interpreter would spend most of its time importing torch.
    spec = importlib.util.spec_from_file_location("make_synth_pedes", REPO / "data_scripts" / "make_synth_pedes.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--out", str(tmp_path / "s"), "--identities", "3", "--height", "32", "--width", "16"]
    assert cli.main(args) == 0
    assert "reused existing" not in capsys.readouterr().out
    assert cli.main(args) == 0
    assert "reused existing" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(args + ["--seed", "4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "seed" in err and "--overwrite" in err
    assert cli.main(args + ["--seed", "4", "--overwrite"]) == 0
