"""Models from checkpoints: the one entry (:func:`load_model`) and the forms callers already use.

Every load takes one path: :func:`~.detect.read_source` reads the file or folder and detects its
format; :func:`~.rules.load_source` applies the named rules and loads strictly. What differs
between the functions here is only who describes the model: the checkpoint (its folder's config,
IRRA's configs.yaml), the caller (an architecture, a size), or an existing model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kd_trainer.models.factory import RetrievalModel, create_model, list_architectures
from kd_trainer.models.loading.detect import read_source
from kd_trainer.models.loading.errors import CheckpointError
from kd_trainer.models.loading.hf_clip import HF_CLIP, HF_WEIGHT_FILES
from kd_trainer.models.loading.irra import IRRA
from kd_trainer.models.loading.openclip import OPEN_CLIP_CONFIG_NAME, OPEN_CLIP_FOLDER
from kd_trainer.models.loading.rules import LoadReport, load_source
from kd_trainer.models.loading.source import PathLike, Source
from kd_trainer.models.loading.stride import create_strided_model

ImageSize = int | tuple[int, int]


@dataclass(frozen=True)
class ModelSpec:
    """A model to build and the checkpoint to load into it: the models layer's view of a recipe's
    ``student:``/``teacher:`` block (the recipe layer fills it in; this layer never reads recipes).

    ``arch`` None: the checkpoint describes the model (a kd_trainer run folder, an open_clip or HF
    folder, IRRA's configs.yaml), projections included. ``arch`` given: the caller does, and the
    checkpoint must fit it; ``image_size`` and ``context_length`` still default to the checkpoint's
    when it records them (IRRA, kd_trainer folders), else to the architecture's.
    """

    checkpoint: PathLike | None = None
    arch: str | dict[str, Any] | None = None
    config: PathLike | None = None  # IRRA's configs.yaml, when not next to the checkpoint
    image_size: ImageSize | None = None  # (H, W)
    context_length: int | None = None
    projection_dim: int | None = None  # the student -> teacher projections' width, with ``arch``
    resize_positions: bool | None = None  # None: every format but kd_trainer's own (see rules.py)
    trusted: bool = False  # read pickles that hold more than tensors (only files you trust)


def load_model(spec: ModelSpec | PathLike) -> RetrievalModel:
    """The model ``spec`` describes, with its checkpoint loaded strictly. A path alone is a checkpoint
    that describes its own model: a kd_trainer run folder (rebuilt as it trained, projections and
    patch stride included), an open_clip or HF folder, or an IRRA ``best.pth`` with its configs.yaml.
    The model's ``load_report`` attribute holds the :class:`LoadReport` when a checkpoint was loaded."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(checkpoint=spec)
    if spec.checkpoint is None:
        if spec.config is not None:
            raise CheckpointError(f"config {str(spec.config)!r} (IRRA's configs.yaml) is given without the "
                                  "checkpoint it describes.")
        if spec.arch is None:
            raise CheckpointError("Neither an architecture nor a checkpoint to build a model from.")
        return create_model(spec.arch, image_size=spec.image_size, context_length=spec.context_length,
                            projection_dim=spec.projection_dim)
    src = read_source(spec.checkpoint, irra_config=spec.config, trusted=spec.trusted)
    return _build_and_load(src, spec)


def _hw(size: ImageSize) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _build_and_load(src: Source, spec: ModelSpec) -> RetrievalModel:
    """Build the model ``src`` and ``spec`` describe together (``spec`` wins), then load ``src`` into it."""
    arch = spec.arch if spec.arch is not None else src.arch
    if arch is None:
        raise CheckpointError(f"{str(src.path)!r} ({src.format}) does not say its architecture: give one, a name "
                              f"from {list_architectures()} or an open_clip-style dict.")
    size = spec.image_size if spec.image_size is not None else src.image_size
    context_length = spec.context_length or src.context_length
    projection_dim = spec.projection_dim if spec.arch is not None else src.projection_dim
    if src.stride_size is not None:
        if size is None:
            raise CheckpointError(f"{str(src.path)!r} strides its patches by {src.stride_size} but does not say "
                                  "its image size, which the patch grid depends on: give image_size.")
        model = create_strided_model(arch, _hw(size), src.stride_size, context_length=context_length,
                                     projection_dim=projection_dim)
    else:
        model = create_model(arch, image_size=size, context_length=context_length, projection_dim=projection_dim)
    if spec.arch is None and src.arch_name is not None:
        model.arch = src.arch_name
    model.load_report = load_source(model, src, spec.resize_positions)
    return model


def load_weights(model: RetrievalModel, path: PathLike, *, irra_config: PathLike | None = None,
                 resize_positions: bool | None = None, trusted: bool = False) -> LoadReport:
    """Load any supported checkpoint into an existing ``model``, strictly (see :mod:`.detect` for the formats).

    ``irra_config``: IRRA's configs.yaml, when not next to the checkpoint. ``resize_positions``: resize
    position embeddings that differ in length (default: for every format but kd_trainer's own).
    ``trusted``: read pickles that hold more than tensors (only for files you trust).
    A checkpoint that records a patch stride (IRRA's ``stride_size``) also sets it on the model.
    """
    return load_source(model, read_source(path, irra_config=irra_config, trusted=trusted), resize_positions)


load_pretrained = load_weights  # the name importers.py gave it


def model_from_checkpoint(path: PathLike, *, arch: str | dict[str, Any] | None = None,
                          image_size: ImageSize | None = None, context_length: int | None = None,
                          irra_config: PathLike | None = None, trusted: bool = False) -> RetrievalModel:
    """A model built and loaded from any supported input, at the size asked. Folders with a config
    (kd_trainer, open_clip, Hugging Face) and IRRA checkpoints say their architecture; bare state dicts
    need ``arch``. Asking for an ``image_size`` or ``context_length`` asks for the position embeddings
    to be resized to it, for kd_trainer's own checkpoints too."""
    resize = True if image_size is not None or context_length is not None else None
    return load_model(ModelSpec(checkpoint=path, arch=arch, config=irra_config, image_size=image_size,
                                context_length=context_length, resize_positions=resize, trusted=trusted))


def model_from_irra(checkpoint: PathLike, config: PathLike | None = None) -> RetrievalModel:
    """IRRA's teacher exactly as IRRA ran it: the CLIP its ``best.pth`` holds, at ``configs.yaml``'s img_size,
    stride_size and text_length (``config`` defaults to the ``configs.yaml`` next to the checkpoint).
    The model's ``load_report`` attribute holds the :class:`LoadReport`."""
    src = read_source(checkpoint, irra_config=config)
    if src.format != IRRA:
        raise CheckpointError(f"{str(checkpoint)!r} is not an IRRA checkpoint (no 'base_model.' keys; "
                              f"it looks like {src.format}).")
    return _build_and_load(src, ModelSpec(checkpoint=checkpoint, config=config))


def model_from_hf_clip(folder: PathLike, image_size: ImageSize | None = None,
                       context_length: int | None = None) -> RetrievalModel:
    """The open_clip dual encoder equivalent to a Hugging Face ``CLIPModel`` folder, at ``image_size``
    (default: the config's) and ``context_length`` (default: max_position_embeddings); position embeddings
    are resized when those differ. The model's ``load_report`` attribute holds the :class:`LoadReport`."""
    src = read_source(folder)
    if src.format != HF_CLIP or src.arch is None:
        raise CheckpointError(f"{str(folder)!r} is not a Hugging Face CLIPModel folder (config.json with "
                              f"model_type 'clip' and one of {list(HF_WEIGHT_FILES)}); found {src.format}.")
    return _build_and_load(src, ModelSpec(checkpoint=folder, image_size=image_size, context_length=context_length))


def model_from_open_clip(folder: PathLike, image_size: ImageSize | None = None,
                         context_length: int | None = None) -> RetrievalModel:
    """The model an open_clip folder (``open_clip_config.json`` + weights) describes, at ``image_size``."""
    src = read_source(folder)
    if src.format != OPEN_CLIP_FOLDER or src.arch is None:
        raise CheckpointError(f"{str(folder)!r} is not an open_clip folder (no {OPEN_CLIP_CONFIG_NAME}).")
    return _build_and_load(src, ModelSpec(checkpoint=folder, image_size=image_size, context_length=context_length))
