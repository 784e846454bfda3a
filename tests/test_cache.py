"""Teacher cache + replayable augmentation: cached teacher embeddings give the online teacher's
loss values, stale caches are refused naming what changed, and the epoch selects the draws."""

from __future__ import annotations

import copy
import logging
import random
from types import SimpleNamespace

import datasets
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, SeedableRandomSampler, skip_first_batches
from transformers import TrainingArguments

from kd_trainer.data.collator import collate_retrieval
from kd_trainer.data.formats import load_pedes
from kd_trainer.data.images import open_image
from kd_trainer.data.pipeline import with_retrieval_transforms
from kd_trainer.data.replay import ReplayConfig, ReplayDataset, ReplayTransform, replay_seed
from kd_trainer.distill.cache import CacheMismatchError, TeacherCache, build_teacher_cache, plan_teacher_source
from kd_trainer.distill.epochs import DatasetEpochCallback
from kd_trainer.distill.retrieval import RetrievalTrainer
from kd_trainer.losses import Features, compute_term
from kd_trainer.models.factory import create_model
from kd_trainer.recipe import TermConfig
from kd_trainer.synthetic.pedes import make_synth_pedes

from tiny import plan_of

SIZE, CTX, K = (32, 16), 64, 2
CFG = ReplayConfig(SIZE, augment=True, context_length=CTX, num_draws=K, seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synth_pedes(root / "SynthPEDES", num_identities=12, images_per_identity=(2, 2), image_size=SIZE, seed=0)
    train = load_pedes("synth_pedes", root)["train"]
    torch.manual_seed(0)
    teacher = create_model("micro", image_size=SIZE, context_length=CTX)
    path = build_teacher_cache(teacher, train, tmp_path_factory.mktemp("cache"), image_size=SIZE, augment=True,
                               context_length=CTX, num_draws=K, batch_size=6, seed=0)
    return train, teacher, path


def batch_at(ds: ReplayDataset, epoch: int, rows: list[int]) -> dict[str, torch.Tensor]:
    ds.set_epoch(epoch)
    return collate_retrieval([ds[i] for i in rows])


# ----------------------------------------------------------------------------- replay


def test_replay_seed_is_stable_and_distinct():
    assert replay_seed(3, 1, 0) == replay_seed(3, 1, 0) == 3611628937446880095  # not a salted hash()
    seeds = {replay_seed(i, k, s) for i in range(4) for k in range(3) for s in range(2)}
    assert len(seeds) == 24 and all(0 <= s < 2**63 for s in seeds)


def test_replay_transform_depends_only_on_image_and_draw(setup):
    train, _, _ = setup
    image = open_image(train[0]["image_path"])
    replay = CFG.replay_transform()
    torch.manual_seed(1), random.seed(1)
    a = replay(image, 5, 0)
    after = torch.rand(3), random.random()
    torch.manual_seed(1), random.seed(1)
    b = replay(image, 5, 0)
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), after[0]) and random.random() == after[1], "caller's RNG streams untouched"
    torch.manual_seed(99), random.seed(99)
    assert torch.equal(replay(image, 5, 0), a), "global RNG state must not matter"
    assert not torch.equal(replay(image, 5, 1), a), "another draw is another augmentation"
    assert not torch.equal(ReplayTransform(replay.transform, base_seed=1)(image, 5, 0), a)


def test_set_epoch_selects_draws(setup):
    train, _, _ = setup
    ds = ReplayDataset(train, CFG)
    m = ds.rows.num_images
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item, rank = ds[i], ds.rows.rank[i]
            assert int(item["draws"]) == (epoch + rank) % K
            assert int(item["cache_image_row"]) == int(item["draws"]) * m + ds.rows.position[i]
            assert int(item["cache_text_row"]) == i
    assert set(ds.rows.rank) == {0, 1}, "two captions per image: ranks 0 and 1"
    ds.set_epoch(0)
    p0 = ds[0]["pixel_values"]
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["pixel_values"], p0)
    ds.set_epoch(2)
    assert torch.equal(ds[0]["pixel_values"], p0), "K=2: epoch 2 replays epoch 0"


@pytest.mark.parametrize("persistent", [False, True])
def test_set_epoch_reaches_dataloader_workers(setup, persistent):
    train, _, _ = setup
    ds = ReplayDataset(train, CFG)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=1, persistent_workers=persistent,
                                         collate_fn=collate_retrieval)
    rank = torch.tensor(ds.rows.rank)
    for epoch in range(3):
        ds.set_epoch(epoch)
        draws = torch.cat([b["draws"] for b in loader])
        assert torch.equal(draws, (epoch + rank) % K)


# ----------------------------------------------------------------------------- exactness


TERMS = ["cross_kd", "motis", "fd", "inter_ts_kl", "icl", "crd", "st_itc", "intra_ts_sd"]


def term_values(student: dict, teacher: dict, pids: torch.Tensor) -> dict[str, float]:
    feats = Features(student_image=student["image_embeds"], student_text=student["text_embeds"], pids=pids, **teacher)
    return {t: compute_term(t, feats).item() for t in TERMS}


def test_cached_terms_equal_online_terms(setup):
    train, teacher, path = setup
    cache = TeacherCache.open(path, teacher=teacher, dataset_raw=train, transform_cfg=CFG)
    ds = ReplayDataset(train, CFG)
    torch.manual_seed(7)
    student = create_model("micro", image_size=SIZE, context_length=CTX).eval()
    for epoch in (0, 3):
        batch = batch_at(ds, epoch, list(range(0, len(ds), 2)) + [1, 3, 5])
        assert set(batch["draws"].tolist()) == {0, 1}, "both draws in the batch"
        with torch.no_grad():
            online = {"teacher_image": teacher.clip.encode_image(batch["pixel_values"]),
                      "teacher_text": teacher.clip.encode_text(batch["input_ids"])}
            cached = cache.lookup(batch)
            s = student(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"])
        for key in online:
            assert cached[key].dtype == torch.float32
            torch.testing.assert_close(cached[key], online[key], rtol=0, atol=1e-5)
        want, got = term_values(s, online, batch["pids"]), term_values(s, cached, batch["pids"])
        for t in TERMS:
            assert abs(want[t] - got[t]) < 1e-5, (t, want[t], got[t])
    # The test has teeth: the other draw's embeddings give visibly different values.
    flipped = dict(batch, cache_image_row=(batch["cache_image_row"] + cache.num_images) % (K * cache.num_images))
    wrong = term_values(s, {**cached, **cache.lookup(flipped, ["teacher_image"])}, batch["pids"])
    assert max(abs(wrong[t] - want[t]) for t in ("cross_kd", "motis", "fd")) > 1e-3


def test_cache_layout_and_lookup_errors(setup):
    train, teacher, path = setup
    names = sorted(p.name for p in path.iterdir())
    assert names == ["cache_meta.json", "image_embeds_k000.safetensors", "image_embeds_k001.safetensors",
                     "index.safetensors", "text_embeds.safetensors"]
    cache = TeacherCache.open(path, teacher=copy.deepcopy(teacher), dataset_raw=train, transform_cfg=CFG)
    assert cache.image_embeds.shape == (K * 16, 32) and cache.text_embeds.shape == (len(train), 32)
    with pytest.raises(KeyError, match="ReplayDataset"):
        cache.lookup({"pixel_values": torch.zeros(1)})
    with pytest.raises(IndexError, match="out of range"):
        cache.lookup({"cache_text_row": torch.tensor([len(train)])}, ["teacher_text"])
    with pytest.raises(CacheMismatchError,
                       match=r"is damaged \(no such folder\): rebuild with `kd-trainer cache-teacher"):
        TeacherCache.open(path / "nowhere", teacher=teacher, dataset_raw=train, transform_cfg=CFG)


# ----------------------------------------------------------------------------- fingerprints


def refusal(setup, *, teacher=None, train=None, cfg=CFG) -> str:
    base_train, base_teacher, path = setup
    with pytest.raises(CacheMismatchError) as err:
        TeacherCache.open(path, teacher=teacher or base_teacher, dataset_raw=train or base_train, transform_cfg=cfg)
    msg = str(err.value)
    assert "kd-trainer cache-teacher" in msg
    return msg


def test_refuses_changed_teacher_weights(setup):
    other = copy.deepcopy(setup[1])
    with torch.no_grad():
        other.clip.text_projection[0, 0] += 1e-3
    msg = refusal(setup, teacher=other)
    assert "teacher weights changed" in msg and "dataset" not in msg and "transform" not in msg


def test_refuses_changed_caption(setup):
    train = setup[0].map(lambda r, i: {"caption": r["caption"] + " x" if i == 3 else r["caption"]}, with_indices=True)
    msg = refusal(setup, train=train)
    assert "dataset changed: caption differ" in msg and "teacher" not in msg.split(":")[1]


def test_refuses_changed_image_size(setup):
    msg = refusal(setup, cfg=ReplayConfig((64, 32), True, CTX, K, 0))
    assert "transform config changed: image_size: cached [32, 16], current [64, 32]" in msg
    assert "teacher weights" not in msg and "dataset changed" not in msg
    assert "num_draws" in refusal(setup, cfg=ReplayConfig(SIZE, True, CTX, 3, 0))


# ----------------------------------------------------------------------------- trainer wiring


def test_trainer_reaches_dataset_set_epoch(setup, tmp_path):
    """transformers 5 / accelerate 1.15, one process: DataLoaderShard.set_epoch -> dataset.set_epoch
    reaches a non-persistent DataLoader worker, without any callback."""
    seen: list[tuple[float, list[int], list[int]]] = []

    class Recording(RetrievalTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            seen.append((self.state.epoch, inputs["draws"].tolist(), inputs["cache_text_row"].tolist()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    train = setup[0]
    ds = ReplayDataset(train, CFG)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=3,
                             report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=1,
                             disable_tqdm=True, logging_strategy="no",
                             remove_unused_columns=False)  # as run.py: keep the cache keys
    student = create_model("micro", image_size=SIZE, context_length=CTX)
    Recording(model=student, args=args, plan=plan_of([TermConfig(name="itc")]),
              train_dataset=ds).train()
    assert len(seen) == 6
    for step, (_, draws, rows) in enumerate(seen):
        epoch = step // 2
        assert draws == [(epoch + ds.rows.rank[r]) % K for r in rows], step


@pytest.mark.parametrize("wrapper", ["ddp", "resume"])
def test_callback_covers_sharded_and_resumed_loaders(setup, wrapper):
    """Under DDP (BatchSamplerShard) and on a mid-epoch resume (skip_first_batches' SkipBatchSampler),
    accelerate 1.15 sets the wrapped sampler's epoch and, by its if/elif, not the dataset's; the callback does."""
    ds = ReplayDataset(setup[0], CFG)
    sampler = torch.utils.data.BatchSampler(SeedableRandomSampler(ds), batch_size=4, drop_last=False)
    if wrapper == "ddp":
        loader = DataLoaderShard(ds, batch_sampler=BatchSamplerShard(sampler, num_processes=2, process_index=0))
    else:
        loader = skip_first_batches(DataLoaderShard(ds, batch_sampler=sampler), 1)
    loader.set_epoch(3)
    assert ds.epoch == 0, "accelerate 1.15 skips dataset.set_epoch here (if this fails, it no longer does)"
    DatasetEpochCallback().on_epoch_begin(None, SimpleNamespace(epoch=3.0), None, train_dataloader=loader)
    assert ds.epoch == 3
    DatasetEpochCallback().on_epoch_begin(None, SimpleNamespace(epoch=4.5), None, train_dataloader=loader)
    assert ds.epoch == 4, "a mid-epoch resume keeps the epoch it resumes"


def test_the_same_callback_sets_a_seeded_splits_epoch(setup):
    """One epoch callback for both kinds of epoch-dependent split: the seeded (non-cache) train
    split draws epoch e's augmentation once the callback has announced epoch e."""
    split = with_retrieval_transforms(datasets.DatasetDict(train=setup[0]), image_size=SIZE, augment=True,
                                      context_length=CTX, seed=0)["train"]
    loader = torch.utils.data.DataLoader(split, batch_size=4, collate_fn=collate_retrieval)
    first = split[0]["pixel_values"]
    DatasetEpochCallback().on_epoch_begin(None, SimpleNamespace(epoch=2.0), None, train_dataloader=loader)
    second = split[0]["pixel_values"]
    assert not torch.equal(second, first), "epoch 2 draws another augmentation of row 0"
    assert torch.equal(split[0]["pixel_values"], second), "and draws it again on a second read"
    DatasetEpochCallback().on_epoch_begin(None, SimpleNamespace(epoch=0.0), None, train_dataloader=loader)
    assert torch.equal(split[0]["pixel_values"], first), "back at epoch 0: epoch 0's draw"


# ----------------------------------------------------------------------------- fallbacks


def test_plan_uses_cache_for_embedding_terms(caplog):
    with caplog.at_level(logging.INFO, logger="kd_trainer"):
        plan = plan_teacher_source([("itc", "both"), ("cross_kd", "both"), ("motis", "image")], cache_available=True)
    assert plan.use_cache and not plan.needs_teacher_model and plan.cached_terms == ("cross_kd", "motis[image]")
    assert "from the cache" in caplog.text
    none = plan_teacher_source([("itc", "both")], cache_available=True)
    assert not none.use_cache and not none.needs_teacher_model
    off = plan_teacher_source([("fd", "both")], cache_available=False)
    assert not off.use_cache and off.needs_teacher_model


