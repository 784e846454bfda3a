"""The teacher cache on disk: its layout, writing it, and opening it for lookups in training.

Layout of a cache directory::

    cache_meta.json              format, fingerprints (teacher / dataset / transform), layout,
                                 build info; written last, so its presence marks a finished cache
    text_embeds.safetensors      "text_embeds": N x D float32, row i = caption row i of the train split
    image_embeds_k000.safetensors  "image_embeds": M x D float32, draw k=0 of every distinct image
    image_embeds_k001.safetensors  ... one shard per draw k < K
    index.safetensors            "image_ids": M int64 (the image of each image row, in order of
                                 first appearance), "text_image_pos": N int64 (each caption's image)

Row ``k*M + p`` of the concatenated image shards is draw k of the p-th image
(:func:`kd_trainer.data.replay.image_row`); :class:`~kd_trainer.data.replay.ReplayDataset` puts
that row (``cache_image_row``) and the caption row (``cache_text_row``) in every item, and
:meth:`TeacherCache.lookup` reads them. :meth:`TeacherCache.open` refuses a cache whose
fingerprints (:mod:`.fingerprint`) differ from the current run's, naming what changed, and
one whose files are missing, truncated or corrupt (:class:`CacheDamagedError`): the meta file
records each file's size and blake2b digest at build time, and opening checks them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
import safetensors.torch
from safetensors import SafetensorError
import torch
from torch import nn

from kd_trainer.data.digest import file_digest
from kd_trainer.data.replay import CACHE_IMAGE_ROW, CACHE_TEXT_ROW, ReplayConfig, TrainRows
from kd_trainer.distill.cache.fingerprint import FINGERPRINT_PARTS, explain_change, fingerprints
from kd_trainer.recipe import RecipeError

__all__ = ["CACHE_META", "CacheDamagedError", "CacheMismatchError", "TeacherCache", "reset_cache_dir", "write_cache"]

CACHE_FORMAT = "kd_trainer.teacher_cache"
CACHE_VERSION = 1
CACHE_META = "cache_meta.json"
TEXT_FILE = "text_embeds.safetensors"
INDEX_FILE = "index.safetensors"
IMAGE_SHARD = "image_embeds_k{k:03d}.safetensors"
IMAGE_SHARD_GLOB = "image_embeds_k*.safetensors"
REBUILD_HINT = "re-run `kd-trainer cache-teacher <recipe>` to rebuild it"


class CacheMismatchError(ValueError):
    """A teacher cache built for another teacher, dataset or transform config."""


class CacheDamagedError(CacheMismatchError):
    """A teacher cache that is missing, unfinished, truncated or corrupt on disk; rebuilding it is the fix.

    A subclass of :class:`CacheMismatchError` so that whatever refuses an unusable cache in one line
    (the command line's bad-input errors) refuses a damaged one the same way.
    """

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"the cache at {path} is damaged ({what}): rebuild with `kd-trainer cache-teacher "
                         f"<recipe> --out {path}`, or train with the online teacher")


_LAYOUT_KEYS = ("num_texts", "num_images", "num_draws", "embed_dim", "text_file", "image_shards")


def _file_record(file: Path) -> dict[str, Any]:
    """Size and blake2b digest of ``file``: what opening the cache checks it against."""
    return {"bytes": file.stat().st_size, "blake2b": file_digest(file)}


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def reset_cache_dir(out: Path) -> None:
    """Create ``out`` and mark it unfinished (no meta file, no image shards of an older build):
    from here until :func:`write_cache` ends, nothing can open it as a cache."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CACHE_META).unlink(missing_ok=True)
        for stale in out.glob(IMAGE_SHARD_GLOB):
            stale.unlink()
    except OSError as e:  # a file where the folder should be, no permission: the path given is wrong
        raise RecipeError(f"the teacher cache cannot be written to {out} ({e.strerror or e}); give "
                          f"`kd-trainer cache-teacher --out` (or teacher.cache) a folder you can write") from None


def write_cache(out: Path, text: torch.Tensor, images: torch.Tensor, rows: TrainRows,
                built_for: dict[str, dict[str, Any]], config: ReplayConfig, build: dict[str, Any]) -> None:
    """Write the tables (``text`` N x D, ``images`` K x M x D) and the index, then the meta file
    (with ``built_for``, the :func:`~.fingerprint.fingerprints` of the build) last and
    atomically, so a crash leaves no ``cache_meta.json``; a write that fails (a full disk) is a
    :class:`CacheDamagedError` saying so, and leaves no meta file either."""
    try:
        _write_tables(out, text, images, rows, built_for, config, build)
    except (OSError, SafetensorError) as e:
        raise CacheDamagedError(out, f"writing it failed: {getattr(e, 'strerror', None) or e}") from None


def _write_tables(out: Path, text: torch.Tensor, images: torch.Tensor, rows: TrainRows,
                  built_for: dict[str, dict[str, Any]], config: ReplayConfig, build: dict[str, Any]) -> None:
    safetensors.torch.save_file({"text_embeds": text.contiguous()}, str(out / TEXT_FILE))
    shards = []
    for k in range(images.shape[0]):
        shards.append(IMAGE_SHARD.format(k=k))
        safetensors.torch.save_file({"image_embeds": images[k].contiguous()}, str(out / shards[-1]))
    safetensors.torch.save_file({"image_ids": torch.tensor(rows.images, dtype=torch.int64),
                                 "text_image_pos": torch.tensor(rows.position, dtype=torch.int64)},
                                str(out / INDEX_FILE))
    files = {name: _file_record(out / name) for name in (TEXT_FILE, *shards, INDEX_FILE)}
    layout = {"num_texts": text.shape[0], "num_images": images.shape[1], "num_draws": images.shape[0],
              "embed_dim": text.shape[1], "dtype": "float32", "text_file": TEXT_FILE, "image_shards": shards,
              "index_file": INDEX_FILE, "image_row": "k * num_images + position"}
    _atomic_json(out / CACHE_META, {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                    "fingerprint": {p: f["digest"] for p, f in built_for.items()},
                                    **built_for, "replay": config.fingerprint_dict(), "layout": layout,
                                    "files": files, "build": build})


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
        cls._check_files(path, meta)
        current = fingerprints(teacher, TrainRows.from_dataset(dataset_raw), transform_cfg)
        changed = [explain_change(p, meta.get(p, {}), current[p]) for p in FINGERPRINT_PARTS
                   if meta.get("fingerprint", {}).get(p) != current[p]["digest"]]
        if changed:
            raise CacheMismatchError(f"teacher cache {path} was built for another run: " + "; ".join(changed)
                                     + f". It cannot be used; {REBUILD_HINT}, or train with the online teacher.")
        return cls._load(path, meta)

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        """The meta file, checked for the keys opening reads; every way it can be absent or broken is a
        :class:`CacheDamagedError` (a build that did not finish leaves no meta file)."""
        file = path / CACHE_META
        if not path.is_dir():
            raise CacheDamagedError(path, "no such folder" if not path.exists() else "not a folder")
        if not file.is_file():
            raise CacheDamagedError(path, f"{CACHE_META} is missing; a build that did not finish leaves none")
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CacheDamagedError(path, f"{CACHE_META} cannot be read: {type(e).__name__}: {e}") from None
        if not isinstance(meta, dict):
            raise CacheDamagedError(path, f"{CACHE_META} holds a JSON {type(meta).__name__}, not an object")
        if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
            raise CacheMismatchError(f"{file} is not a version-{CACHE_VERSION} {CACHE_FORMAT} (format "
                                     f"{meta.get('format')!r}, version {meta.get('version')!r}); {REBUILD_HINT}")
        layout = meta.get("layout")
        missing = [k for k in _LAYOUT_KEYS if k not in layout] if isinstance(layout, dict) else ["layout"]
        if missing or not isinstance(meta.get("fingerprint"), dict) or not isinstance(layout["image_shards"], list):
            raise CacheDamagedError(path, f"{CACHE_META} lacks {missing or ['fingerprint']}")
        return meta

    @staticmethod
    def _check_files(path: Path, meta: dict[str, Any]) -> None:
        """Every file the meta names is there, whole and unchanged (size and digest of the build;
        caches built before digests were recorded are checked for presence only)."""
        lay = meta["layout"]
        records = meta.get("files") or {}
        for name in (lay["text_file"], *lay["image_shards"], *records):
            file = path / name
            if not file.is_file():
                raise CacheDamagedError(path, f"{name} is missing")
            want = records.get(name)
            if want is None:
                continue
            size = file.stat().st_size
            if size != want.get("bytes"):
                what = "truncated" if size < want.get("bytes", 0) else "longer than built"
                raise CacheDamagedError(path, f"{name} is {what}: {size} bytes, the build wrote {want.get('bytes')}")
            if _file_record(file)["blake2b"] != want.get("blake2b"):
                raise CacheDamagedError(path, f"{name} is corrupt: its contents changed since the build "
                                              f"(blake2b digest differs)")

    @classmethod
    def _load(cls, path: Path, meta: dict[str, Any]) -> "TeacherCache":
        lay = meta["layout"]

        def table(name: str, key: str) -> torch.Tensor:
            try:
                return safetensors.torch.load_file(str(path / name))[key]
            except KeyError:
                raise CacheDamagedError(path, f"{name} holds no {key!r} table") from None
            except (SafetensorError, OSError) as e:  # a bad header, short data
                raise CacheDamagedError(path, f"{name} cannot be read: {type(e).__name__}: "
                                              f"{' '.join(str(e).split())}") from None

        text = table(lay["text_file"], "text_embeds")
        images = torch.cat([table(s, "image_embeds") for s in lay["image_shards"]])
        want = {"text": (lay["num_texts"], lay["embed_dim"]),
                "image": (lay["num_images"] * lay["num_draws"], lay["embed_dim"])}
        if tuple(text.shape) != want["text"] or tuple(images.shape) != want["image"]:
            raise CacheDamagedError(path, f"text {tuple(text.shape)}, images {tuple(images.shape)}, but "
                                          f"{CACHE_META} says {want}")
        return cls(images, text, num_draws=lay["num_draws"], meta=meta, path=path)

    def lookup(self, batch: Mapping[str, torch.Tensor],
               embeddings: Iterable[str] = ("teacher_image", "teacher_text")) -> dict[str, torch.Tensor]:
        """The teacher embeddings named in ``embeddings`` (``teacher_image`` / ``teacher_text``; student
        ones are skipped) of the batch's rows, on the batch's device:
        exactly the keys (and raw float32 values) of :func:`~kd_trainer.distill.retrieval.teacher_embeddings`."""
        out: dict[str, torch.Tensor] = {}
        for name in embeddings:
            key, table = ((CACHE_IMAGE_ROW, self.image_embeds) if name == "teacher_image" else
                          (CACHE_TEXT_ROW, self.text_embeds) if name == "teacher_text" else (None, None))
            if key is None:
                continue  # a student embedding: nothing cached
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
            out[name] = table[index].to(rows.device, non_blocking=True)
        return out
