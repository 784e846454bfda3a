"""A teacher cache that is missing, truncated or corrupt on disk, in any of its files, is refused in one
line that says to rebuild it (issue 24): from TeacherCache.open, and from the command line with exit 2
and no traceback. Real caches built by `kd-trainer cache-teacher` from a tiny recipe."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from kd_trainer.cli import main
from kd_trainer.data.formats import load_pedes
from kd_trainer.data.replay import ReplayConfig
from kd_trainer.distill.cache import CacheDamagedError, TeacherCache
from kd_trainer.models.factory import create_model
from kd_trainer.synthetic.pedes import make_synth_pedes

SIZE, CTX, K = (32, 16), 64, 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(recipe path, cache folder, train split, teacher) with the cache written by the CLI."""
    work = tmp_path_factory.mktemp("cache_damage")
    make_synth_pedes(work / "data" / "SynthPEDES", num_identities=8, images_per_identity=(2, 2), image_size=SIZE,
                     seed=0)
    recipe = {"name": "cached", "seed": 0,
              "data": {"name": "synth_pedes", "root": str(work / "data"), "image_size": list(SIZE),
                       "context_length": CTX},
              "student": {"arch": "micro"},
              "teacher": {"arch": "micro", "cache": str(work / "cache"), "cache_draws": K},
              "loss": {"terms": [{"name": "cross_kd"}]},
              "training": {"output_dir": str(work / "out"), "max_steps": 1, "per_device_train_batch_size": 4,
                           "use_cpu": True, "report_to": "none", "disable_tqdm": True}}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    main(["cache-teacher", str(path), "--batch-size", "8"])
    train = load_pedes("synth_pedes", work / "data", splits=["train"])["train"]
    return path, work / "cache", train


def _teacher():
    torch.manual_seed(0)  # the recipe's seed: build_model seeds the architecture's initialisation with it
    return create_model("micro", image_size=SIZE, context_length=CTX)


def _damaged_copy(built, tmp_path: Path, how) -> Path:
    _, cache, _ = built
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    how(copy)
    return copy


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # inside the float data: the header still parses, the numbers are wrong
    file.write_bytes(bytes(data))


def _drop_layout(cache: Path) -> None:
    meta = json.loads((cache / "cache_meta.json").read_text())
    del meta["layout"]
    (cache / "cache_meta.json").write_text(json.dumps(meta))


DAMAGE = [
    ("meta missing", lambda c: (c / "cache_meta.json").unlink(), "cache_meta.json is missing"),
    ("meta truncated", lambda c: _truncate(c / "cache_meta.json"), "cache_meta.json cannot be read: JSONDecodeError"),
    ("meta not an object", lambda c: (c / "cache_meta.json").write_text("[1, 2]"),
     "cache_meta.json holds a JSON list, not an object"),
    ("meta without layout", _drop_layout, "cache_meta.json lacks ['layout']"),
    ("shard missing", lambda c: (c / "image_embeds_k001.safetensors").unlink(), "image_embeds_k001.safetensors is "
                                                                                "missing"),
    ("shard truncated", lambda c: _truncate(c / "image_embeds_k000.safetensors"),
     "image_embeds_k000.safetensors is truncated"),
    ("shard corrupt", lambda c: _flip_last_byte(c / "image_embeds_k001.safetensors"),
     "image_embeds_k001.safetensors is corrupt: its contents changed since the build"),
    ("text table truncated", lambda c: _truncate(c / "text_embeds.safetensors"), "text_embeds.safetensors is truncated"),
    ("index corrupt", lambda c: _flip_last_byte(c / "index.safetensors"), "index.safetensors is corrupt"),
]


@pytest.mark.parametrize("case, how, what", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_cache_is_refused_naming_the_file(built, tmp_path, case, how, what):
    _, _, train = built
    cache = _damaged_copy(built, tmp_path, how)
    with pytest.raises(CacheDamagedError) as e:
        TeacherCache.open(cache, teacher=_teacher(), dataset_raw=train,
                          transform_cfg=ReplayConfig(SIZE, True, CTX, K, 0))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"the cache at {cache} is damaged (") and what in msg, msg
    assert msg.endswith(f"): rebuild with `kd-trainer cache-teacher <recipe> --out {cache}`, or train with the "
                        "online teacher")


def test_an_intact_cache_opens(built):
    _, cache, train = built
    opened = TeacherCache.open(cache, teacher=_teacher(), dataset_raw=train,
                               transform_cfg=ReplayConfig(SIZE, True, CTX, K, 0))
    assert opened.num_draws == K and opened.text_embeds.shape[0] == len(train)


def test_a_cache_from_before_digests_is_checked_for_its_files_only(built, tmp_path):
    """Caches written before the meta file recorded sizes and digests still open; a missing file is still found."""
    _, _, train = built

    def without_digests(c: Path) -> None:
        meta = json.loads((c / "cache_meta.json").read_text())
        del meta["files"]
        (c / "cache_meta.json").write_text(json.dumps(meta))

    cache = _damaged_copy(built, tmp_path, without_digests)
    cfg = ReplayConfig(SIZE, True, CTX, K, 0)
    assert TeacherCache.open(cache, teacher=_teacher(), dataset_raw=train, transform_cfg=cfg).num_draws == K
    _truncate(cache / "image_embeds_k000.safetensors")
    with pytest.raises(CacheDamagedError, match=r"image_embeds_k000.safetensors cannot be read: SafetensorError"):
        TeacherCache.open(cache, teacher=_teacher(), dataset_raw=train, transform_cfg=cfg)


def test_the_command_line_says_it_in_one_line_and_exits_2(built, tmp_path, capsys):
    recipe, cache, _ = built
    damaged = _damaged_copy(built, tmp_path, lambda c: _truncate(c / "image_embeds_k001.safetensors"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", str(recipe), f"teacher.cache={damaged}", f"training.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: the cache at {damaged} is damaged (image_embeds_k001.safetensors is truncated")


def test_a_cache_folder_that_cannot_be_written_is_one_line(built, tmp_path, capsys):
    recipe, _, _ = built
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["cache-teacher", str(recipe), "--out", str(blocker / "cache")])  # today: a FileExistsError traceback
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: the teacher cache cannot be written to {blocker / 'cache'} (")


def test_a_full_disk_while_writing_leaves_no_usable_cache_and_says_so(built, tmp_path, monkeypatch, capsys):
    recipe, _, _ = built
    real = safetensors.torch.save_file
    calls = []

    def fills_up(tensors, filename, *a, **kw):  # the second table written finds the disk full
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    out = tmp_path / "cache"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["cache-teacher", str(recipe), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"error: the cache at {out} is damaged (writing it failed: No space left on device): rebuild" in err
    assert not (out / "cache_meta.json").exists()
