"""The teacher cache: the frozen teacher's embeddings of the training set, computed once.

Every loss term of :mod:`kd_trainer.losses` reads only the teacher's *final* embeddings, and
the teacher is frozen, so its forward pass in every training step recomputes numbers that are
the same every epoch, except for the image augmentation. With replayable augmentation
(:mod:`kd_trainer.data.replay`: K seeded draws per image) there are only ``K x images`` image
embeddings and ``captions`` text embeddings to compute; after that, distillation costs a
student step plus a table lookup.

Layout of a cache directory (``build_teacher_cache``)::

    cache_meta.json              format, fingerprints (teacher / dataset / transform), layout,
                                 build info; written last, so its presence marks a finished cache
    text_embeds.safetensors      "text_embeds": N x D float32, row i = caption row i of the train split
    image_embeds_k000.safetensors  "image_embeds": M x D float32, draw k=0 of every distinct image
    image_embeds_k001.safetensors  ... one shard per draw k < K
    index.safetensors            "image_ids": M int64 (the image of each image row, in order of
                                 first appearance), "text_image_pos": N int64 (each caption's image)

Embeddings are raw (unnormalised) ``teacher.clip.encode_image/encode_text`` outputs in
float32, exactly what :func:`kd_trainer.distill.trainer.teacher_embeddings` produces; every term
normalises. Row ``k*M + p`` of the concatenated image shards is draw k of the p-th image
(:func:`kd_trainer.data.replay.image_row`); :class:`~kd_trainer.data.replay.ReplayDataset`
puts that row (``cache_image_row``) and the caption row (``cache_text_row``) in every item.

:meth:`TeacherCache.open` recomputes three fingerprints and refuses a cache whose
teacher (weights and architecture), dataset (train annotations: image paths relative to their
common folder, captions, pids, image ids, image file sizes) or transform config (image size,
augment, context length, K, seed, the transform's repr, torchvision/Pillow versions) differ,
naming which and how.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import safetensors.torch
import torch
from torch import nn

from kd_trainer.data.formats import open_image
from kd_trainer.data.replay import (
    CACHE_IMAGE_ROW,
    CACHE_TEXT_ROW,
    ReplayConfig,
    TrainRows,
)
from kd_trainer.data.tokenizer import tokenize
from kd_trainer.losses.registry import STUDENT_TOWERS, TEACHER_TOWERS, get_term

__all__ = [
    "CACHEABLE_TOWERS",
    "CACHE_META",
    "CacheMismatchError",
    "TeacherCache",
    "TeacherSourcePlan",
    "build_teacher_cache",
    "dataset_fingerprint",
    "plan_teacher_source",
    "teacher_fingerprint",
    "term_uses_cache",
    "transform_fingerprint",
]

logger = logging.getLogger("kd_trainer")

CACHE_FORMAT = "kd_trainer.teacher_cache"
CACHE_VERSION = 1
CACHE_META = "cache_meta.json"
TEXT_FILE = "text_embeds.safetensors"
INDEX_FILE = "index.safetensors"
IMAGE_SHARD = "image_embeds_k{k:03d}.safetensors"
REBUILD_HINT = "re-run `kd-trainer cache-teacher <recipe>` to rebuild it"
# The teacher outputs a cache holds. A term reading anything else (e.g. a future mimic term on
# patch tokens or attention maps) needs the online teacher.
CACHEABLE_TOWERS = frozenset({"teacher_image", "teacher_text"})


class CacheMismatchError(ValueError):
    """A teacher cache built for another teacher, dataset or transform config."""


# ----------------------------------------------------------------------------- fingerprints


def _sha(data: bytes | Any) -> str:
    return hashlib.sha256(data if isinstance(data, (bytes, bytearray)) else
                          json.dumps(data, sort_keys=True).encode()).hexdigest()


def _teacher_architecture(teacher: nn.Module) -> dict[str, Any]:
    """What, besides the weights, changes the teacher's outputs (activation, sizes, patch stride)."""
    from kd_trainer.models.factory import get_architecture

    arch = getattr(teacher, "arch", None)
    clip = getattr(teacher, "clip", teacher)
    conv = getattr(getattr(clip, "visual", None), "conv1", None)
    return {
        "arch": get_architecture(arch) if arch is not None else None,
        "image_size": list(getattr(teacher, "image_size", ()) or ()),
        "context_length": getattr(teacher, "context_length", None),
        "patch_stride": list(conv.stride) if conv is not None else None,
    }


def teacher_fingerprint(teacher: nn.Module) -> dict[str, Any]:
    """sha256 over every state-dict tensor (name, dtype, shape, bytes, in name order), and the
    architecture. Sound, and cheap: ~1 s for a ViT-B/16 (600 MB) on one core."""
    h = hashlib.sha256()
    state = teacher.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    arch = _teacher_architecture(teacher)
    weights = h.hexdigest()
    return {"digest": _sha({"weights": weights, "architecture": arch}), "weights": weights,
            "architecture": arch, "num_tensors": len(state)}


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def dataset_fingerprint(rows: TrainRows) -> dict[str, Any]:
    """A digest per annotation column, in row order. Image paths count relative to their common
    folder, so a dataset moved or mounted elsewhere keeps its cache; image content is guarded
    by file sizes (hashing every image's bytes would cost a full read of the dataset)."""
    root = os.path.commonpath(rows.image_paths) if rows.image_paths else ""
    if len(rows.image_paths) == 1:
        root = os.path.dirname(root)
    columns = {
        "image_path": _sha([p[len(root):] if p.startswith(root) else p for p in rows.image_path]),
        "caption": _sha(rows.caption),
        "pid": _sha(rows.pid),
        "image_id": _sha(rows.image_id),
        "image_file_size": _sha([_file_size(p) for p in rows.image_paths]),
    }
    return {"digest": _sha(columns), "columns": columns, "rows": len(rows), "images": rows.num_images}


def transform_fingerprint(config: ReplayConfig) -> dict[str, Any]:
    """The transform config, and its digest."""
    cfg = config.fingerprint_dict()
    return {"digest": _sha(cfg), "config": cfg}


def _fingerprints(teacher: nn.Module, rows: TrainRows, config: ReplayConfig) -> dict[str, dict[str, Any]]:
    return {"teacher": teacher_fingerprint(teacher), "dataset": dataset_fingerprint(rows),
            "transform": transform_fingerprint(config)}


def _explain(part: str, cached: dict[str, Any], current: dict[str, Any]) -> str:
    """One human sentence on what changed in one fingerprint part."""
    if part == "teacher":
        what = [w for w in ("weights", "architecture") if cached.get(w) != current.get(w)]
        return (f"teacher {' and '.join(what) or 'fingerprint'} changed (cached weights sha256 "
                f"{str(cached.get('weights'))[:12]}, current {str(current.get('weights'))[:12]})")
    if part == "dataset":
        cols = [c for c in current["columns"] if cached.get("columns", {}).get(c) != current["columns"][c]]
        return (f"dataset changed: {', '.join(cols) or 'annotations'} differ (cached {cached.get('rows')} rows / "
                f"{cached.get('images')} images, current {current['rows']} rows / {current['images']} images)")
    old, new = cached.get("config", {}), current["config"]
    diffs = [f"{k}: cached {old.get(k)!r}, current {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    return f"transform config changed: {'; '.join(diffs) or 'digest differs'}"


# ----------------------------------------------------------------------------- building


class _ImageDraws(torch.utils.data.Dataset):
    """Item p: the K replayed draws of the p-th distinct image (decoded once), ``K x 3 x H x W``."""

    def __init__(self, rows: TrainRows, config: ReplayConfig, dataset_name: str) -> None:
        self.paths, self.ids = rows.image_paths, rows.images
        self.replay, self.num_draws, self.dataset_name = config.replay_transform(), config.num_draws, dataset_name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, p: int) -> tuple[int, torch.Tensor]:
        image = open_image(self.paths[p], self.dataset_name)
        return p, torch.stack([self.replay(image, self.ids[p], k) for k in range(self.num_draws)])


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on an accelerator; fp32 (exact) on CPU or when asked."""
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else (
            "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _embed_texts(teacher: nn.Module, rows: TrainRows, config: ReplayConfig, device: torch.device,
                 batch_size: int, amp: Any, progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    chunks = []
    for start in tqdm(range(0, len(rows), batch_size), desc="teacher cache: captions", disable=not progress):
        ids = tokenize(rows.caption[start:start + batch_size], config.context_length).to(device)
        with amp:
            chunks.append(teacher.clip.encode_text(ids).float().cpu())
    return torch.cat(chunks)


def _embed_images(teacher: nn.Module, rows: TrainRows, config: ReplayConfig, device: torch.device,
                  batch_size: int, amp: Any, progress: bool, num_workers: int, dataset_name: str) -> torch.Tensor:
    """``K x M x D``: every draw of every image; each image decoded once, its K draws in one batch."""
    from tqdm.auto import tqdm

    k = config.num_draws
    loader = torch.utils.data.DataLoader(_ImageDraws(rows, config, dataset_name), batch_size=max(1, batch_size // k),
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    out: torch.Tensor | None = None
    for pos, pixels in tqdm(loader, desc="teacher cache: images", disable=not progress):
        b = pixels.shape[0]
        with amp:
            emb = teacher.clip.encode_image(pixels.flatten(0, 1).to(device, non_blocking=True)).float().cpu()
        if out is None:
            out = torch.empty(k, rows.num_images, emb.shape[1], dtype=torch.float32)
        out[:, pos] = emb.view(b, k, -1).transpose(0, 1)
    assert out is not None, "the train split has no images"
    return out


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def build_teacher_cache(
    teacher: nn.Module,
    train_dataset_raw: datasets.Dataset,
    out_dir: str | os.PathLike,
    *,
    image_size: tuple[int, int],
    augment: bool,
    context_length: int = 77,
    num_draws: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    dataset_name: str = "",
    progress: bool = False,
    num_workers: int = 0,
    precision: str = "auto",
) -> Path:
    """One pass of the frozen teacher over the train split; returns ``out_dir``.

    Text: one embedding per caption row (captions are not augmented, so exact). Images: K
    replayed draws per distinct image (:class:`~kd_trainer.data.replay.ReplayTransform`,
    seeded by (image_id, k, seed)). ``batch_size`` counts images/captions per forward.
    ``precision``: ``auto`` = fp32 on CPU, bf16 autocast on GPU (match the run's mixed
    precision for the smallest cached-vs-online difference); stored as float32 either way.
    The teacher is put back on its device and in its train/eval mode afterwards.
    """
    out = Path(out_dir)
    config = ReplayConfig(tuple(image_size), bool(augment), int(context_length), int(num_draws), int(seed))
    rows = TrainRows.from_dataset(train_dataset_raw)
    name = dataset_name or (train_dataset_raw.info.dataset_name or "")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fingerprints = _fingerprints(teacher, rows, config)
    out.mkdir(parents=True, exist_ok=True)
    (out / CACHE_META).unlink(missing_ok=True)  # from here until the end the directory is an unfinished cache
    for stale in out.glob("image_embeds_k*.safetensors"):
        stale.unlink()
    was_training, home = teacher.training, next(teacher.parameters()).device
    start = time.perf_counter()
    try:
        teacher.eval().to(dev)
        with torch.inference_mode():
            text = _embed_texts(teacher, rows, config, dev, batch_size, _autocast(dev, precision), progress)
            images = _embed_images(teacher, rows, config, dev, batch_size, _autocast(dev, precision), progress,
                                   num_workers, name)
    finally:
        teacher.to(home).train(was_training)
    _write(out, text, images, rows, fingerprints, config,
           build={"device": str(dev), "precision": precision, "seconds": round(time.perf_counter() - start, 2),
                  "torch": torch.__version__, "dataset_name": name, "batch_size": batch_size})
    logger.info("teacher cache: %d captions, %d images x %d draws -> %s", len(rows), rows.num_images, num_draws, out)
    return out


def _write(out: Path, text: torch.Tensor, images: torch.Tensor, rows: TrainRows,
           fingerprints: dict[str, Any], config: ReplayConfig, build: dict[str, Any]) -> None:
    """Shards first, the meta file last (atomically): a crash leaves no cache_meta.json."""
    safetensors.torch.save_file({"text_embeds": text.contiguous()}, str(out / TEXT_FILE))
    shards = []
    for k in range(images.shape[0]):
        shards.append(IMAGE_SHARD.format(k=k))
        safetensors.torch.save_file({"image_embeds": images[k].contiguous()}, str(out / shards[-1]))
    safetensors.torch.save_file({"image_ids": torch.tensor(rows.images, dtype=torch.int64),
                                 "text_image_pos": torch.tensor(rows.position, dtype=torch.int64)},
                                str(out / INDEX_FILE))
    layout = {"num_texts": text.shape[0], "num_images": images.shape[1], "num_draws": images.shape[0],
              "embed_dim": text.shape[1], "dtype": "float32", "text_file": TEXT_FILE, "image_shards": shards,
              "index_file": INDEX_FILE, "image_row": "k * num_images + position"}
    _atomic_json(out / CACHE_META, {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                    "fingerprint": {p: f["digest"] for p, f in fingerprints.items()},
                                    **fingerprints, "replay": config.fingerprint_dict(), "layout": layout,
                                    "build": build})


# ----------------------------------------------------------------------------- reading


class TeacherCache:
    """Cached teacher embeddings; :meth:`lookup` replaces the teacher forward in a training step.

    ``image_embeds`` is ``(K*M) x D`` (row ``k*M + p``), ``text_embeds`` ``N x D``, both float32.
    Built by :func:`build_teacher_cache` and opened with :meth:`open`; the constructor is for
    in-memory caches (tests, benchmarks).
    """

    def __init__(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, *, num_draws: int,
                 meta: dict[str, Any] | None = None, path: Path | None = None) -> None:
        if image_embeds.shape[0] % num_draws:
            raise ValueError(f"{image_embeds.shape[0]} image rows do not split into {num_draws} draws")
        self.image_embeds, self.text_embeds = image_embeds, text_embeds
        self.num_draws, self.num_images = int(num_draws), image_embeds.shape[0] // int(num_draws)
        self.meta, self.path = meta or {}, path

    def __repr__(self) -> str:
        return (f"TeacherCache({self.num_images} images x {self.num_draws} draws, {self.text_embeds.shape[0]} "
                f"captions, dim {self.text_embeds.shape[1]}, on {self.device}, path={self.path})")

    @property
    def device(self) -> torch.device:
        return self.text_embeds.device

    def to(self, device: str | torch.device) -> "TeacherCache":
        """Move the tables onto the training device. Recommended on a GPU (CUHK-PEDES at K=8 is ~0.7 GB):
        ``lookup`` is then a gather with no host sync; with the tables on the CPU, each lookup first
        copies the batch's rows to the host, which waits for the GPU work queued before it."""
        self.image_embeds, self.text_embeds = self.image_embeds.to(device), self.text_embeds.to(device)
        return self

    @classmethod
    def open(cls, path: str | os.PathLike, *, teacher: nn.Module, dataset_raw: datasets.Dataset,
             transform_cfg: ReplayConfig) -> "TeacherCache":
        """Open the cache at ``path`` after checking it was built for this teacher, train split and
        transform config; :class:`CacheMismatchError` names every part that differs."""
        path = Path(path)
        meta = cls._read_meta(path)
        current = _fingerprints(teacher, TrainRows.from_dataset(dataset_raw), transform_cfg)
        changed = [_explain(p, meta.get(p, {}), current[p]) for p in ("teacher", "dataset", "transform")
                   if meta.get("fingerprint", {}).get(p) != current[p]["digest"]]
        if changed:
            raise CacheMismatchError(f"teacher cache {path} was built for another run: " + "; ".join(changed)
                                     + f". It cannot be used; {REBUILD_HINT}, or train with the online teacher.")
        return cls._load(path, meta)

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        file = path / CACHE_META
        if not file.is_file():
            raise FileNotFoundError(f"no teacher cache at {path} ({CACHE_META} missing; a build that did not "
                                    f"finish leaves none); {REBUILD_HINT}")
        meta = json.loads(file.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
            raise CacheMismatchError(f"{file} is not a version-{CACHE_VERSION} {CACHE_FORMAT} (format "
                                     f"{meta.get('format')!r}, version {meta.get('version')!r}); {REBUILD_HINT}")
        return meta

    @classmethod
    def _load(cls, path: Path, meta: dict[str, Any]) -> "TeacherCache":
        lay = meta["layout"]
        text = safetensors.torch.load_file(str(path / lay["text_file"]))["text_embeds"]
        images = torch.cat([safetensors.torch.load_file(str(path / s))["image_embeds"] for s in lay["image_shards"]])
        want = {"text": (lay["num_texts"], lay["embed_dim"]),
                "image": (lay["num_images"] * lay["num_draws"], lay["embed_dim"])}
        if tuple(text.shape) != want["text"] or tuple(images.shape) != want["image"]:
            raise CacheMismatchError(f"teacher cache {path} is damaged: text {tuple(text.shape)}, images "
                                     f"{tuple(images.shape)}, but {CACHE_META} says {want}; {REBUILD_HINT}")
        return cls(images, text, num_draws=lay["num_draws"], meta=meta, path=path)

    def lookup(self, batch: Mapping[str, torch.Tensor],
               towers: Iterable[str] = ("teacher_image", "teacher_text")) -> dict[str, torch.Tensor]:
        """``teacher_image`` / ``teacher_text`` of the batch's rows, on the batch's device:
        exactly the keys (and raw float32 values) of :func:`~kd_trainer.distill.trainer.teacher_embeddings`."""
        out: dict[str, torch.Tensor] = {}
        for tower in towers:
            key, table = ((CACHE_IMAGE_ROW, self.image_embeds) if tower == "teacher_image" else
                          (CACHE_TEXT_ROW, self.text_embeds) if tower == "teacher_text" else (None, None))
            if key is None:
                continue  # a student tower: nothing cached
            if key not in batch:
                raise KeyError(f"the batch has no {key!r}: training from a teacher cache needs the train split "
                               f"wrapped in kd_trainer.data.replay.ReplayDataset (batch keys: {sorted(batch)})")
            rows = batch[key]
            index = rows.to(table.device, non_blocking=True)
            # Checked only on the CPU, where it costs no device sync. On a GPU, rows out of range are
            # caught by the device-side index assert; open() already verified the train split matches.
            if index.device.type == "cpu" and bool((index < 0).any() | (index >= table.shape[0]).any()):
                raise IndexError(f"{key} out of range for a teacher cache with {table.shape[0]} rows: "
                                 f"the cache does not belong to this train split; {REBUILD_HINT}")
            out[tower] = table[index].to(rows.device, non_blocking=True)
        return out


# ----------------------------------------------------------------------------- which terms


def term_uses_cache(name: str, side: str = "both") -> bool:
    """True when term ``name`` (for ``side``) reads only teacher outputs the cache holds.

    Every term of :mod:`kd_trainer.losses` reads only final embeddings, so all qualify. A term
    reading intermediate teacher features (a tower outside ``CACHEABLE_TOWERS``, or a spec
    flagged ``reads_teacher_internals``) does not.
    """
    spec = get_term(name)
    teacher_towers = spec.towers(side) - STUDENT_TOWERS
    return teacher_towers <= CACHEABLE_TOWERS and not getattr(spec, "reads_teacher_internals", False)


@dataclass(frozen=True)
class TeacherSourcePlan:
    """Where one stage's teacher embeddings come from.

    ``use_cache``: ``TeacherCache.lookup`` replaces the teacher forward. When any teacher term
    needs the online teacher, the whole stage uses it (its forward yields the final embeddings
    anyway, and from the replayed images they equal the cached ones).
    """

    cached_terms: tuple[str, ...]
    online_terms: tuple[str, ...]
    use_cache: bool
    needs_teacher_model: bool
    message: str


def _name_side(term: Any) -> tuple[str, str, str]:
    """(label, name, side) of an ``ActiveTerm``, a ``TermConfig`` or a ``(name, side)`` pair."""
    cfg = getattr(term, "config", term)
    if isinstance(cfg, (tuple, list)):
        name, side = cfg
        return (name if side == "both" else f"{name}[{side}]"), name, side  # as TermConfig.key
    return getattr(cfg, "key", cfg.name), cfg.name, cfg.side


def plan_teacher_source(terms: Iterable[Any], *, cache_available: bool, stage: str = "",
                        log: logging.Logger | None = logger) -> TeacherSourcePlan:
    """Decide cache vs online teacher for one stage's terms, and log one line saying which.

    ``terms``: the stage's ``ActiveTerm``s (``trainer.stage_terms[i]``), ``TermConfig``s, or
    ``(name, side)`` pairs.
    """
    teacher_terms = [_name_side(t) for t in terms]
    teacher_terms = [t for t in teacher_terms if get_term(t[1]).towers(t[2]) & TEACHER_TOWERS]
    cached = tuple(label for label, n, s in teacher_terms if cache_available and term_uses_cache(n, s))
    online = tuple(label for label, _, _ in teacher_terms if label not in cached)
    where = f"stage {stage!r}: " if stage else ""
    if not teacher_terms:
        plan = TeacherSourcePlan((), (), False, False, f"{where}no term reads the teacher")
    elif not online:
        plan = TeacherSourcePlan(cached, (), True, False,
                                 f"{where}teacher embeddings from the cache for {list(cached)} (no teacher forward)")
    elif not cache_available:
        plan = TeacherSourcePlan((), online, False, True, f"{where}no teacher cache: online teacher for {list(online)}")
    else:
        plan = TeacherSourcePlan((), online + cached, False, True,
                                 f"{where}terms {list(online)} read teacher features the cache does not hold "
                                 f"(only final embeddings are cached): falling back to the online teacher for "
                                 f"this stage, cache unused")
    if log is not None:
        (log.warning if plan.online_terms and cache_available else log.info)("teacher source: %s", plan.message)
    return plan
