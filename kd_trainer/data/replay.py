"""Replayable augmentation: IRRA's training transform with its randomness fixed by (image, draw).

Distillation from a teacher cache (built in the distill layer) needs the student to see
*exactly* the augmented image the teacher embedded when the cache was built. So instead of
drawing fresh randomness for every sample, the training transform runs with the random
number generators seeded by ``replay_seed(image_id, k, seed)``: draw ``k`` of image
``image_id`` is the same tensor in the cache builder, in a DataLoader worker, on any process.

Only ``num_draws`` (K) augmentations per image exist. :class:`ReplayDataset` gives row ``i``
(one caption of an image) the draw ``k = (epoch + r) % K``, where ``r`` is the row's rank among
the rows of its image (0 for the first caption, 1 for the second ...). So the two captions of a
CUHK-PEDES image see different views in the same epoch (as with online augmentation), and
every caption cycles through all K views in K epochs.

**Trade-off.** Online augmentation shows a new view every epoch; here the (caption, view)
pairs repeat exactly after K epochs. With IRRA's 60 epochs and K = 8, each pair is seen 7-8
times instead of once. K trades cache size (``images x K x dim x 4`` bytes: CUHK-PEDES at
K = 8, dim 512 is ~560 MB) and one-off build time (K teacher passes over the images) against
augmentation diversity; K >= the number of epochs gives online augmentation's diversity
(each view used once per caption) at K times the cache size.

Every random transform of ``kd_trainer.data.transforms`` (RandomHorizontalFlip, RandomCrop,
RandomErasing; torchvision v1) draws only from torch's default CPU generator; Python's
``random`` is seeded as well so a future RandomChoice/RandomOrder stays replayable. Both are
restored afterwards, so replaying never disturbs the caller's random streams. CUDA generators
are never touched (``torch.manual_seed`` would reseed them too, changing dropout on the GPU).

The epoch reaches the dataset through ``set_epoch``. It is stored in a shared-memory tensor, so
DataLoader workers see it whether they are persistent or not. Who calls ``set_epoch``:

- one process: the Trainer calls ``DataLoaderShard.set_epoch(epoch)`` before each epoch's
  ``iter()``, and accelerate 1.15 forwards it to ``dataset.set_epoch`` (its last ``elif``);
- several processes, or a resume from a mid-epoch checkpoint: accelerate wraps the batch sampler
  (``BatchSamplerShard``; ``skip_first_batches``' ``SkipBatchSampler``), sets the epoch of the
  sampler inside it and, because that branch of its ``if/elif`` matched, *not* the dataset's.

So whatever drives training must call ``set_epoch`` itself at every epoch start, before the
epoch's ``iter()``: the trainer's epoch callback (``kd_trainer.distill.epochs``) does. This
module knows nothing about the Trainer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import datasets
import PIL
import torch
import torchvision
from PIL import Image

from kd_trainer.data.images import open_image
from kd_trainer.data.tokenizer import tokenize
from kd_trainer.data.transforms import build_image_transform, run_seeded, stable_seed

__all__ = [
    "REPLAY_VERSION",
    "CACHE_IMAGE_ROW",
    "CACHE_TEXT_ROW",
    "ReplayConfig",
    "ReplayDataset",
    "ReplayTransform",
    "TrainRows",
    "draw_index",
    "image_row",
    "replay_seed",
]

# Bumped whenever the seeding scheme or draw assignment changes: part of the cache fingerprint.
REPLAY_VERSION = 1
# The batch keys that index a teacher cache.
CACHE_IMAGE_ROW = "cache_image_row"
CACHE_TEXT_ROW = "cache_text_row"


def replay_seed(image_id: int, k: int, base_seed: int) -> int:
    """A 63-bit seed for draw ``k`` of image ``image_id``, the same in the cache builder, in every
    DataLoader worker and in every later run."""
    return stable_seed(f"kd_trainer.replay:v{REPLAY_VERSION}:{int(base_seed)}:{int(image_id)}:{int(k)}")


def draw_index(epoch: int, rank: int, num_draws: int) -> int:
    """The draw a row uses in ``epoch``: ``(epoch + rank) % K`` (see the module docstring)."""
    return (int(epoch) + int(rank)) % int(num_draws)


def image_row(position: int | torch.Tensor, k: int | torch.Tensor, num_images: int) -> Any:
    """Row of draw ``k`` of the image at ``position`` in the cache's image matrix: shard-major,
    so shard ``k`` holds rows ``k*M .. k*M+M-1``."""
    return k * num_images + position


class ReplayTransform:
    """Runs ``transform`` with torch's CPU generator and Python's ``random`` seeded by
    ``replay_seed(image_id, k, base_seed)``, restoring both afterwards.

    A module-level class so DataLoader workers can pickle it.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], base_seed: int = 0) -> None:
        self.transform = transform
        self.base_seed = int(base_seed)

    def __call__(self, image: Image.Image, image_id: int, k: int) -> torch.Tensor:
        return run_seeded(self.transform, image, replay_seed(image_id, k, self.base_seed))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_seed={self.base_seed}, transform={self.transform!r})"


@dataclass(frozen=True)
class ReplayConfig:
    """What fixes the augmented images and tokens a cache was built for (its transform fingerprint).

    ``image_size`` is (height, width); ``augment`` is IRRA's ``--img_aug``; ``num_draws`` is K.
    """

    image_size: tuple[int, int]
    augment: bool
    context_length: int
    num_draws: int
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))
        if self.num_draws < 1:
            raise ValueError(f"num_draws (K) must be >= 1, got {self.num_draws}")

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """IRRA's training transform for this size and augment flag."""
        return build_image_transform(self.image_size, train=True, augment=self.augment)

    def replay_transform(self) -> ReplayTransform:
        return ReplayTransform(self.image_transform(), self.seed)

    def fingerprint_dict(self) -> dict[str, Any]:
        """Everything that changes the cached inputs, JSON-ready. Library versions are in because
        a torchvision or Pillow upgrade may change resizing or how the transforms draw."""
        return {
            **asdict(self),
            "image_size": list(self.image_size),
            "transform": repr(self.image_transform()),
            "replay_version": REPLAY_VERSION,
            "torchvision": torchvision.__version__.split("+")[0],
            "pillow": PIL.__version__,
        }


@dataclass
class TrainRows:
    """The raw train split as plain lists, plus each row's image position and rank.

    ``images`` lists the distinct ``image_id`` in order of first appearance; ``position[i]`` is
    row i's index in it; ``rank[i]`` counts the earlier rows of the same image.
    """

    image_path: list[str]
    caption: list[str]
    pid: list[int]
    image_id: list[int]
    images: list[int]
    image_paths: list[str]
    position: list[int]
    rank: list[int]

    @classmethod
    def from_dataset(cls, dataset_raw: datasets.Dataset) -> "TrainRows":
        """Read the four raw columns (ignoring any ``with_transform``) and index the images."""
        cols = dataset_raw.with_format(None)[:]
        missing = [c for c in ("image_path", "caption", "pid", "image_id") if c not in cols]
        if missing:
            raise ValueError(f"the train split lacks the raw columns {missing}; pass load_pedes(...)['train'] "
                             f"(columns image_path, caption, pid, image_id), got {sorted(cols)}")
        first: dict[int, int] = {}
        image_paths: list[str] = []
        position, rank, seen = [], [], {}
        for path, iid in zip(cols["image_path"], cols["image_id"]):
            if iid not in first:
                first[iid] = len(first)
                image_paths.append(path)
            position.append(first[iid])
            rank.append(seen.get(iid, 0))
            seen[iid] = rank[-1] + 1
        return cls(list(cols["image_path"]), list(cols["caption"]), [int(p) for p in cols["pid"]],
                   [int(i) for i in cols["image_id"]], list(first), image_paths, position, rank)

    def __len__(self) -> int:
        return len(self.caption)

    @property
    def num_images(self) -> int:
        return len(self.images)


class ReplayDataset(torch.utils.data.Dataset):
    """The train split for training from a teacher cache: IRRA's transform, replayed.

    Items: ``pixel_values`` (draw ``k`` of the row's image), ``input_ids``, ``pids``,
    ``image_ids`` as in :mod:`kd_trainer.data.pipeline`, plus ``cache_image_row`` and
    ``cache_text_row`` (int64 scalars) that :meth:`TeacherCache.lookup` reads, and ``draws``
    (the k used; for logging and tests).
    """

    def __init__(self, dataset_raw: datasets.Dataset, config: ReplayConfig, dataset_name: str = "") -> None:
        self.rows = TrainRows.from_dataset(dataset_raw)
        self.config = config
        self.replay = config.replay_transform()
        self.dataset_name = dataset_name or (dataset_raw.info.dataset_name or "")
        # Shared memory: workers (persistent ones included) read the epoch set in the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch``; called by accelerate and by the trainer's epoch callback."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def __len__(self) -> int:
        return len(self.rows)

    def draw(self, index: int) -> int:
        """The draw ``k`` row ``index`` uses in the current epoch."""
        return draw_index(self.epoch, self.rows.rank[index], self.config.num_draws)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rows, k = self.rows, self.draw(index)
        image = open_image(rows.image_path[index], self.dataset_name)
        as_long = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
        return {
            "pixel_values": self.replay(image, rows.image_id[index], k),
            "input_ids": tokenize([rows.caption[index]], self.config.context_length)[0],
            "pids": as_long(rows.pid[index]),
            "image_ids": as_long(rows.image_id[index]),
            CACHE_IMAGE_ROW: as_long(image_row(rows.position[index], k, rows.num_images)),
            CACHE_TEXT_ROW: as_long(index),
            "draws": as_long(k),
        }
