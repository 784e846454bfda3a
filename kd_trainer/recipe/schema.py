"""The recipe: one YAML file that says everything about a run.

A recipe is one of three types, chosen by its ``task:`` (:data:`Recipe`, :data:`RECIPE_TYPES`):
retrieval (the default; CLIP dual encoders with loss terms), classification and detection (their
own task loss plus mimic jobs). Each type holds only the keys its task reads, down to the data
block's generator (``data.synth``, ``data.shapes``, ``data.det``), so a key of another task is
refused by name. Every type holds the data, the student, the mimic jobs' teachers and a
``training:`` block that is passed as-is to ``transformers.TrainingArguments``.
Every key is validated: an unknown key or a value of the wrong type is an error that
names the key (``data.image_size``, ``training.learning_rate``), never a silent default.
Reading a recipe file, its ``key.sub=value`` overrides and its error messages live in
:mod:`kd_trainer.recipe.loading`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator,
                      model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python
from transformers import TrainingArguments

from kd_trainer.data.formats import canonical_dataset_name
from kd_trainer.data.tokenizer import check_context_length
from kd_trainer.losses import get_term
from kd_trainer.models.derive import DERIVE_KEYS, derive_architecture
from kd_trainer.models.factory import list_architectures
from kd_trainer.recipe.optim import OptimConfig, renamed
from kd_trainer.recipe.mimic import MimicConfig, check_exact_accumulation, parse_mimic_config, resolve_mimic_teachers
from kd_trainer.recipe.schedules import ScheduleLike
from kd_trainer.synthetic.detection import check_synth_det_args
from kd_trainer.synthetic.pedes import check_synth_pedes_args
from kd_trainer.synthetic.shapes import check_synth_shapes_args


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Strict):
    """Generate SynthPEDES under ``<root>/SynthPEDES`` when it is missing (demo and tests)."""

    num_identities: int = 400
    images_per_identity: tuple[int, int] = (3, 5)
    image_size: tuple[int, int] = (96, 48)
    seed: int = 0
    split_identities: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="(train, val, test) shares of the identities")
    disjoint_from: tuple[int, int] | None = Field(
        None, description="(num_identities, seed) of another SynthPEDES whose people this one leaves out: "
                          "a teacher's pre-training corpus that shares no person with the target set")

    @model_validator(mode="after")
    def _generable(self) -> "SynthConfig":
        # The generator's own rule, checked when the recipe is read rather than when the data is made.
        check_synth_pedes_args(self.num_identities, self.images_per_identity, self.image_size, self.split_identities,
                               self.disjoint_from)
        return self


class ShapesConfig(_Strict):
    """SynthShapes (the classification example), generated under ``<root>/SynthShapes``."""

    num_classes: int = 10
    train_per_class: int = 60
    test_per_class: int = 20
    image_size: int = 32
    seed: int = 0

    @model_validator(mode="after")
    def _generable(self) -> "ShapesConfig":
        check_synth_shapes_args(self.num_classes, self.train_per_class, self.test_per_class, self.image_size)
        return self


class SynthDetConfig(_Strict):
    """SynthDet (the detection example), generated under ``<root>/SynthDet``."""

    num_classes: int = 6
    train_images: int = 400
    test_images: int = 100
    image_size: int = 96
    max_objects: int = 4
    seed: int = 0

    @model_validator(mode="after")
    def _generable(self) -> "SynthDetConfig":
        check_synth_det_args(self.num_classes, self.train_images, self.test_images, self.image_size, self.max_objects)
        return self


class _DataBase(_Strict):
    """What every task's ``data:`` block holds: the data set's name and the folder above it."""

    name: str
    root: str = Field("./data", description="Folder holding the dataset folder (e.g. ./data/CUHK-PEDES).")


class DataConfig(_DataBase):
    """A retrieval recipe's data: a text-to-image person-retrieval set (``task: retrieval``)."""

    name: str = Field(description="cuhk_pedes | icfg_pedes | rstpreid | synth_pedes (case and -/_ insensitive)")
    image_size: tuple[int, int] = Field((384, 128), description="(height, width) fed to the models.")
    augment: bool = Field(True, description="IRRA's --img_aug: flip, pad+crop, random erasing.")
    context_length: int = Field(77, description="Caption length in tokens (CLIP BPE).")
    eval_split: Literal["val", "test"] = Field(
        "val", description="Split evaluated during training; datasets without val (ICFG-PEDES) fall back to test.")
    test_split: Literal["val", "test"] | None = Field("test", description="Split evaluated after training; null skips.")
    skip_unreadable: bool = Field(
        False, description="Drop unreadable images (missing, empty, not an image, truncated, unsupported, corrupt) "
                           "and captions that cannot be encoded at load, counted by kind; decodes the train images "
                           "to find them.")
    verify_images: bool = Field(
        False, description="Decode every train image at load (in parallel), so an unreadable one stops the run "
                           "before training. Val/test images are always decoded. Implied by skip_unreadable.")
    duplicates: Literal["warn", "error", "drop"] = Field(
        "warn", description="Repeated (image, caption) pairs in a split: keep and warn, refuse, or keep the first.")
    synth: SynthConfig | None = Field(None, description="Only for synth_pedes: generate the data if missing.")

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) <= 0:
            raise ValueError("image_size must be two positive ints (height, width)")
        return v

    @field_validator("context_length")
    @classmethod
    def _fits_a_caption(cls, v: int) -> int:
        return check_context_length(v)  # the tokenizer's rule, checked when the recipe is read

    @model_validator(mode="after")
    def _known_set(self) -> "DataConfig":
        name = canonical_dataset_name(self.name)  # an unknown name lists the valid ones
        if self.synth is not None and name != "synth_pedes":
            raise ValueError(f"data.synth is only for synth_pedes, but data.name is {self.name!r}")
        return self


class ShapesDataConfig(_DataBase):
    """A classification recipe's data: SynthShapes, generated from ``shapes`` (``task: classification``)."""

    name: Literal["synth_shapes"] = Field(description="synth_shapes, the set the classification example runs on.")
    shapes: ShapesConfig = Field(description="How SynthShapes is generated (under `<root>/SynthShapes`).")


class DetDataConfig(_DataBase):
    """A detection recipe's data: SynthDet, generated from ``det`` (``task: detection``)."""

    name: Literal["synth_det"] = Field(description="synth_det, the set the detection example runs on.")
    det: SynthDetConfig = Field(description="How SynthDet is generated (under `<root>/SynthDet`).")


LayerSelection = Union[Literal["first", "uniform", "uniform_last"], list[int]]


class InheritConfig(_Strict):
    """Weight inheritance: the student's tensors taken from a larger source model."""

    source: str = Field(
        "teacher", description="teacher (the recipe's teacher, as loaded), or any checkpoint the importers read: "
                               "IRRA best.pth, OpenAI .pt, open_clip, a HF CLIPModel folder, a run folder.")
    config: str | None = Field(None, description="IRRA's configs.yaml for an IRRA source checkpoint.")
    layers: LayerSelection | dict[Literal["vision", "text"], LayerSelection] = Field(
        "first", description="Which source layers the student keeps, for both towers or per tower: first "
                             "(layers 0..n-1, the original), uniform (every k-th, TinyCLIP), uniform_last "
                             "(evenly spaced, last included), or a list of source layer indices.")


class ModelConfig(_Strict):
    arch: str | dict[str, Any] = Field(description="Architecture name (kd_trainer/models/configs/*.json) or dict.")
    checkpoint: str | None = Field(
        None, description="Weights to load: a kd_trainer run/output folder (continue from an earlier run), an "
                          "open_clip/OpenAI/TinyCLIP state dict, a Hugging Face CLIPModel folder, or IRRA's best.pth.")
    config: str | None = Field(
        None, description="IRRA's configs.yaml for an IRRA checkpoint (the seed's --teacher_model_config); "
                          "null: the configs.yaml next to the checkpoint.")
    cache: str | None = Field(
        None, description="Teacher only: a cache written by `kd-trainer cache-teacher` (text embeddings, and "
                          "image embeddings of `cache_draws` replayed augmentations per image); embedding-level "
                          "terms read it instead of running the teacher.")
    cache_draws: int = Field(8, gt=0, description="Augmentation draws per image in the cache (K).")
    cache_seed: int = Field(0, description="Seeds the cached draws; kept apart from the run's seed so that "
                                           "changing the run's seed does not invalidate the cache.")
    # A student derived from a named architecture: e.g. {arch: clip-vit-b16, vision_layers: 6}.
    vision_layers: int | None = Field(None, gt=0, description="Derive: this many vision layers.")
    text_layers: int | None = Field(None, gt=0, description="Derive: this many text layers.")
    vision_width: int | None = Field(None, gt=0, description="Derive: vision width (keeps the head width).")
    text_width: int | None = Field(None, gt=0, description="Derive: text width (keeps the head width).")
    vision_heads: int | None = Field(None, gt=0, description="Derive: vision attention heads.")
    text_heads: int | None = Field(None, gt=0, description="Derive: text attention heads.")
    embed_dim: int | None = Field(None, gt=0, description="Derive: joint embedding width.")
    vision_mlp_ratio: float | None = Field(None, gt=0, description="Derive: vision MLP width / width.")
    text_mlp_ratio: float | None = Field(None, gt=0, description="Derive: text MLP width / width.")
    inherit: InheritConfig | None = Field(
        None, description="Student only: initialise every tensor from a source model by layer selection and "
                          "channel slicing (TinyCLIP's weight inheritance), strictly; then `checkpoint` is not given.")

    @property
    def derived(self) -> dict[str, Any]:
        """The architecture changes written beside ``arch`` (empty: the architecture as named)."""
        return {k: v for k in DERIVE_KEYS if (v := getattr(self, k)) is not None}

    def architecture(self) -> str | dict[str, Any]:
        """The architecture to build: as named, or derived from the name with the changes above."""
        return derive_architecture(self.arch, **self.derived) if self.derived else self.arch

    @model_validator(mode="after")
    def _derivable(self) -> "ModelConfig":
        if self.derived:
            derive_architecture(self.arch, **self.derived)  # a width the heads cannot split is named here
        if self.inherit is not None and self.checkpoint is not None:
            raise ValueError("give either `checkpoint:` (load these weights) or `inherit:` (take them from a "
                             "source by the inheritance rules), not both")
        return self


class SelectConfig(_Strict):
    """Which checkpoint of the last stage a run keeps: the evaluation with the best ``metric``."""

    metric: Literal["r1", "r5", "r10", "mAP", "mINP"] = Field("r1", description="Higher is better.")
    split: Literal["val", "test"] = Field(
        "val", description="Split evaluated every epoch to choose on. test reproduces the original, and is "
                           "test-set selection: report it as such. Datasets without val (ICFG-PEDES) use test.")


class TermConfig(_Strict):
    name: str = Field(description="A registered loss term (see `kd-trainer terms`).")
    weight: ScheduleLike = Field(1.0, description="A number, or a schedule (see kd_trainer/recipe/schedules.py).")
    temperature: float | None = Field(None, gt=0, description="Absolute temperature; null uses the term's default.")
    side: Literal["image", "text", "both"] = "both"
    group: Literal["task", "distill"] | None = Field(
        None, description="Which side of the alpha mix the term is on; null takes the term's kind (`kd-trainer terms`).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments of the term.")

    @model_validator(mode="after")
    def _registered(self) -> "TermConfig":
        # An unknown name lists the closest registered terms; the side, temperature and extra
        # arguments are the registry's rule, checked here when the recipe is read.
        get_term(self.name).check_use(self.side, self.kwargs, self.temperature)
        return self

    @property
    def key(self) -> str:
        """The name the term is logged under: ``motis`` or, for one side only, ``motis[image]``."""
        return self.name if self.side == "both" else f"{self.name}[{self.side}]"


class LossConfig(_Strict):
    terms: list[TermConfig] = Field(min_length=1)
    alpha: ScheduleLike | None = Field(
        None, description="If set: total = alpha * (distill terms) + (1 - alpha) * (task terms), as the original "
                          "mixes them; each term's own weight applies inside its group. Null: a plain weighted sum.")

    @model_validator(mode="after")
    def _unique(self) -> "LossConfig":
        keys = [t.key for t in self.terms]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"terms listed twice: {dup}; merge them into one entry with the summed weight")
        return self


Trainable = Union[Literal["image", "text", "all"], list[str]]


class StageConfig(_Strict):
    """One stage of a sequential method: its length, what trains, and its loss.

    Every stage starts with a fresh optimizer and learning-rate schedule (see
    ``kd_trainer/distill/stages.py``), as the original's sequential training does.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Used in logs (`<name>/loss_<term>`) and reports.")
    epochs: int | None = Field(None, gt=0, description="Length in epochs (exactly one of epochs/steps).")
    steps: int | None = Field(None, gt=0, description="Length in optimizer steps (exactly one of epochs/steps).")
    trainable: Trainable = Field(
        "all", description="image | text | all, or a list of parameter-name prefixes of the student "
                           "(e.g. clip.visual.transformer.resblocks.9). Everything else is frozen.")
    learning_rate: float | None = Field(None, gt=0, description="This stage's peak LR; null: training.learning_rate.")
    optim: OptimConfig | None = Field(
        None, description="This stage's optimiser and LR schedule, over the recipe's `optim:` (written fields win).")
    eval_hybrids: list[Literal["image", "text"]] | None = Field(
        None, description="Hybrid pairings evaluated in this stage: image = student image x teacher text, "
                          "text = teacher image x student text. Null: the tower this stage trains, if only one.")
    loss: LossConfig

    @model_validator(mode="after")
    def _length(self) -> "StageConfig":
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"stage {self.name!r} needs exactly one of `epochs` or `steps`")
        if isinstance(self.trainable, list) and not self.trainable:
            raise ValueError(f"stage {self.name!r}: `trainable` is an empty list; nothing would train")
        return self


class _RecipeBase(_Strict):
    """What every task's recipe holds. A recipe is one of :data:`RECIPE_TYPES`, chosen by ``task:``
    (see :data:`Recipe`); each type holds only the keys its task reads."""

    about: ClassVar[str]  # what a recipe of this task trains, in one phrase

    name: str = Field(description="Run name, used in reports and model cards.")
    method: str | None = Field(None, description="Display label in reports, e.g. 'MoTIS (2 stages)'.")
    task: str
    seed: int = 42
    data: _DataBase
    student: ModelConfig
    teachers: dict[str, ModelConfig] | None = Field(
        None, description="Named teachers for `mimic:` jobs (teacher0, teacher1, ...), as in UP/EOD.")
    mimic: MimicConfig | None = Field(
        None, description="UP/EOD mimic config, in either of UP's shapes (docs/mimic.md: one job, or "
                          "mimic_as_jobs: true with mimic_job0, mimic_job1, ...), or a list of jobs in our "
                          "field names (kd_trainer/recipe/mimic.py); parsed once into a MimicConfig.")
    training: dict[str, Any] = Field(default_factory=dict, description="transformers.TrainingArguments, as-is.")
    nonfinite_skips: int = Field(
        0, ge=0, description="Micro-batches whose loss is NaN or infinite that may be skipped (zero gradient) before "
                             "the run stops; 0 stops at the first, naming the terms and the step. A model with "
                             "non-finite weights is never exported or pushed.")
    resume_changes: list[str] = Field(
        default_factory=list,
        description="Keys (dotted, e.g. training.max_steps, or a block such as stages.1) that a resumed run may "
                    "change from the recipe.yaml it started with; other changes to keys that shape training are "
                    "refused, listed by key. recipe.yaml keeps the recipe the run started with, and resumes.json "
                    "records each resume: its step, its checkpoint and every accepted change. '*' accepts any.")

    @model_validator(mode="before")
    @classmethod
    def _other_tasks_at_default(cls, raw: Any) -> Any:
        """Drop the keys of other tasks that are null or hold their default. A recipe.yaml saved before
        the recipe was split by task holds every key of every task, mostly null; it still parses, to the
        recipe it ran. A key of another task with a value is refused as an unknown key."""
        if not isinstance(raw, dict):
            return raw
        others = [t for t in RECIPE_TYPES.values() if t is not cls]
        raw = _without_defaults_of(raw, cls, others)
        if isinstance(raw.get("data"), dict):
            raw["data"] = _without_defaults_of(raw["data"], _data_type(cls), [_data_type(t) for t in others])
        return raw

    @field_validator("training")
    @classmethod
    def _training_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        validate_training_args(v)
        return v

    @field_validator("mimic", mode="before")
    @classmethod
    def _mimic_parses(cls, v: Any) -> MimicConfig | None:
        if v is None or isinstance(v, MimicConfig):
            return v
        return parse_mimic_config(v)  # errors name the key (mimic.mimic_job1.teacher0.mimic_name ...)

    @model_validator(mode="after")
    def _models(self) -> "_RecipeBase":
        if self.student.cache is not None:
            raise ValueError("student.cache: only a teacher's embeddings can be cached (teacher.cache)")
        named = self.named_teachers
        if any(t.inherit is not None for t in named.values()):
            raise ValueError("inherit: is for the student (a teacher loads its own checkpoint)")
        if self.mimic is not None:  # jobs name defined teachers; UP's teacher_weight becomes their checkpoint
            resolve_mimic_teachers(self.mimic, named)
        return self

    @property
    def named_teachers(self) -> dict[str, ModelConfig]:
        """The teachers a mimic job may name: ``teachers:``, and ``teacher:`` as ``teacher`` where the
        task has that key."""
        one = getattr(self, "teacher", None)  # detection has no `teacher:` key
        return {**(self.teachers or {}), **({"teacher": one} if one is not None else {})}


class RetrievalRecipe(_RecipeBase):
    """``task: retrieval`` (the default): CLIP dual encoders on a person-retrieval set."""

    about: ClassVar[str] = ("trains CLIP dual encoders on a person-retrieval set with the loss terms of `loss:` "
                            "or `stages:`, and `mimic:` jobs")

    task: Literal["retrieval"] = Field(
        "retrieval", description="retrieval (the default, so `task:` may be left out); the other tasks are "
                                 "other recipe types.")
    data: DataConfig
    teacher: ModelConfig | None = Field(
        None, description="The teacher the loss terms read (live, or from its `cache`), a student may inherit "
                          "from, and mimic jobs may name `teacher`.")
    loss: LossConfig | None = Field(None, description="A single-stage run's loss (or give `stages`).")
    stages: list[StageConfig] | None = Field(None, description="Ordered stages of a sequential method.")
    optim: OptimConfig | None = Field(
        None, description="The optimiser and LR schedule: {preset: irra} reproduces the seed commands' IRRA code "
                          "(Adam, eps 1e-3, coupled weight decay, bias/head groups, per-epoch warm-up + cosine); "
                          "null or {preset: trainer}: the Trainer's own, from `training:`. Each stage gets a fresh one.")
    precision: Annotated[Literal["irra_fp16"] | None, renamed("precision", "original", "irra_fp16")] = Field(
        None, description="irra_fp16: the fp16 weights of IRRA's code (Linear, Conv, attention and projection "
                          "matrices of student and teacher; LayerNorm in fp32), the student trained in them "
                          "(`original`, its earlier name, is still read as irra_fp16). Null: fp32 weights, with "
                          "training.bf16/fp16 for mixed precision (recommended).")
    select: SelectConfig | None = Field(
        None, description="Keep the best evaluation of the last stage (by `metric`, on `split`) as the run's final "
                          "student, as the original keeps best.pth; null keeps the last weights.")
    contrastive_accumulation: Literal["plain", "exact"] = Field(
        "plain", description="With training.gradient_accumulation_steps k > 1: plain accumulates k micro-batch "
                             "losses (batch-dependent terms then see k batches of b, not one of k*b); exact "
                             "computes every term over the whole group of k*b and backpropagates it one "
                             "micro-batch at a time (the gradient cache): the update of one batch of k*b, with "
                             "one micro-batch's activations in memory.")

    @model_validator(mode="after")
    def _loss_or_stages(self) -> "RetrievalRecipe":
        self._check_architectures()
        self._check_optim_and_precision()
        if self.contrastive_accumulation == "exact":
            check_exact_accumulation(self.mimic.jobs if self.mimic is not None else [])
        if self.mimic is not None and not self.mimic.task_loss:
            raise ValueError("mimic.task_loss: false only applies to task: classification (it drops the "
                             "cross-entropy); a retrieval recipe's task terms are the ones under `loss:`/`stages:`")
        if (self.loss is None) == (self.stages is None):
            raise ValueError("give exactly one of `loss:` (one stage) or `stages:` (a sequential method)")
        if self.stages is not None:
            if not self.stages:
                raise ValueError("`stages:` is empty")
            names = [s.name for s in self.stages]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"stage names must be unique, {dup} repeat")
            fixed = [k for k in ("num_train_epochs", "max_steps") if k in self.training]
            if fixed:
                raise ValueError(f"training.{fixed[0]} conflicts with `stages:`: each stage sets its own length "
                                 "(stages.N.epochs or stages.N.steps)")
        needs = [t.key for t in self.all_terms if get_term(t.name).needs_teacher]
        if needs and self.teacher is None:
            raise ValueError(f"loss terms {needs} read a teacher, but the recipe has no `teacher:`")
        return self

    def stage_optim(self, stage: "StageConfig | None") -> OptimConfig | None:
        """A stage's effective ``optim:`` block: the recipe's, with the stage's written fields on top."""
        own = stage.optim if stage is not None else None
        return self.optim.merged(own) if self.optim is not None else own

    def _check_optim_and_precision(self) -> None:
        presets = [s.name for s in self.stages or [] if s.learning_rate is not None
                   and (eff := self.stage_optim(s)) is not None and not eff.uses_trainer]
        if presets:
            raise ValueError(f"stages {presets} set learning_rate beside an `optim:` preset; give the stage's LR as "
                             "stages.N.optim.lr")
        if self.precision == "irra_fp16":
            mixed = [k for k in ("fp16", "bf16") if self.training.get(k)]
            if mixed:
                raise ValueError(f"precision: irra_fp16 trains fp16 weights itself; drop training.{mixed[0]}")
            if self.mimic is not None:
                raise ValueError("precision: irra_fp16 with mimic jobs is not supported: adapters are fp32 and "
                                 "would receive fp16 features")
        if self.select is not None and not self.evaluates_during_training:
            raise ValueError("select: keeps the best evaluation, so the run must evaluate: set "
                             "training.eval_strategy: epoch")

    def _check_architectures(self) -> None:
        """Every architecture named by a string is a named CLIP architecture."""
        known = list_architectures()
        for role, cfg in (("student", self.student), ("teacher", self.teacher), *(self.teachers or {}).items()):
            if cfg is not None and isinstance(cfg.arch, str) and cfg.arch not in known:
                close = difflib.get_close_matches(cfg.arch, known, n=3)
                raise ValueError(f"{role}.arch: unknown architecture {cfg.arch!r}"
                                 + (f"; did you mean {', '.join(close)}?" if close else "")
                                 + f" Named architectures: {', '.join(known)} (or give the architecture as a dict)")

    @property
    def evaluates_during_training(self) -> bool:
        """Whether the Trainer evaluates while training (``training.eval_strategy`` other than ``no``): only
        then is ``data.eval_split`` (or ``select.split``) read, so only then must it exist."""
        return self.training.get("eval_strategy", "no") not in ("no", None)

    @property
    def split_evaluated_during_training(self) -> str | None:
        """``select.split`` with ``select:``, else ``data.eval_split``; None when nothing is evaluated during training."""
        if not self.evaluates_during_training:
            return None
        return self.select.split if self.select is not None else self.data.eval_split

    @property
    def all_terms(self) -> list[TermConfig]:
        """Every term of every stage (the single stage of a `loss:` recipe)."""
        if self.stages is None:
            return list(self.loss.terms) if self.loss is not None else []
        return [t for s in self.stages for t in s.loss.terms]


class _MimicTaskRecipe(_RecipeBase):
    """A task that trains with its own task loss plus the recipe's ``mimic:`` jobs, in one stage with
    the Trainer's optimiser and schedule (``training:``; accumulation is always plain: a task loss plus
    mimic jobs has no batch-dependent term to compute over a whole group, and the resolved run says so)."""


class ClassificationRecipe(_MimicTaskRecipe):
    """``task: classification``: torchvision classifiers on SynthShapes."""

    about: ClassVar[str] = ("trains with its own task loss (cross-entropy) plus `mimic:` jobs: torchvision "
                            "classifiers on synth_shapes")

    task: Literal["classification"] = Field(
        "classification", description="classification: torchvision classifiers on synth_shapes.")
    data: ShapesDataConfig
    teacher: ModelConfig | None = Field(
        None, description="A teacher that mimic jobs may name `teacher`, beside the named `teachers:`.")


class DetectionRecipe(_MimicTaskRecipe):
    """``task: detection``: torchvision Faster R-CNNs on SynthDet; its teachers are ``teachers:``
    (teacher0, teacher1, ... as the mimic jobs name them)."""

    about: ClassVar[str] = ("trains with its own task loss plus `mimic:` jobs from its `teachers:`: torchvision "
                            "Faster R-CNNs on synth_det")

    task: Literal["detection"] = Field("detection", description="detection: torchvision Faster R-CNNs on synth_det.")
    data: DetDataConfig


RECIPE_TYPES: dict[str, type[_RecipeBase]] = {
    "retrieval": RetrievalRecipe, "classification": ClassificationRecipe, "detection": DetectionRecipe}


def recipe_type(raw: Any) -> type[_RecipeBase]:
    """The recipe type of a raw recipe's ``task:`` (retrieval when it has none)."""
    task = raw.get("task", "retrieval") if isinstance(raw, dict) else getattr(raw, "task", None)
    if not isinstance(task, str) or task not in RECIPE_TYPES:
        raise RecipeError(f"task: {task!r} is not a task; expected one of {', '.join(RECIPE_TYPES)} "
                          "(none: retrieval)")
    return RECIPE_TYPES[task]


def _task_tag(raw: Any) -> str | None:
    try:
        return recipe_type(raw).model_fields["task"].default
    except RecipeError:
        return None


# A recipe: one of the task types, chosen by `task:`. Type hints name it; `parse_recipe` builds one
# (or pydantic, as `TypeAdapter(Recipe)`, whose error locations then start with the task).
Recipe = Annotated[Union[tuple(Annotated[t, Tag(task)] for task, t in RECIPE_TYPES.items())],  # type: ignore[valid-type]
                   Discriminator(_task_tag)]


def _data_type(recipe: type[_RecipeBase]) -> type[BaseModel]:
    return recipe.model_fields["data"].annotation  # type: ignore[return-value]


def _unset(field: FieldInfo, value: Any) -> bool:
    """``value`` says nothing beyond the field's absence: null, or the field's default."""
    default = field.get_default(call_default_factory=True)
    return value is None or (default is not PydanticUndefined
                             and to_jsonable_python(default) == to_jsonable_python(value))


def _without_defaults_of(raw: dict[str, Any], mine: type[BaseModel], others: list[type[BaseModel]]) -> dict[str, Any]:
    """``raw`` less its keys that ``mine`` lacks and that are null, or hold their default, in every one of
    ``others`` that has them."""
    kept = {}
    for key, value in raw.items():
        theirs = [m.model_fields[key] for m in others if key in m.model_fields]
        if key in mine.model_fields or not theirs or not all(_unset(f, value) for f in theirs):
            kept[key] = value
    return kept


# --- TrainingArguments validation -------------------------------------------------------------

def _training_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


# TrainingArguments accepts these silently (or fails only deep inside training).
_RANGES = (
    ("learning_rate", lambda v: v >= 0, "a learning rate >= 0"),
    ("per_device_train_batch_size", lambda v: v >= 1, "a batch size >= 1"),
    ("per_device_eval_batch_size", lambda v: v >= 1, "a batch size >= 1"),
    ("gradient_accumulation_steps", lambda v: v >= 1, "an integer >= 1"),
    ("max_steps", lambda v: v == -1 or v >= 1, "-1 (train num_train_epochs) or a step count >= 1"),
    ("num_train_epochs", lambda v: v > 0, "a number of epochs > 0"),
    ("weight_decay", lambda v: v >= 0, "a weight decay >= 0"),
    ("warmup_steps", lambda v: v >= 0, "a step count >= 0"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "a ratio in [0, 1]"),
    ("logging_steps", lambda v: v > 0, "a step count (or fraction) > 0"),
    ("save_steps", lambda v: v > 0, "a step count (or fraction) > 0"),
    ("eval_steps", lambda v: v > 0, "a step count (or fraction) > 0"),
    ("dataloader_num_workers", lambda v: v >= 0, "a worker count >= 0"),
    ("max_grad_norm", lambda v: v >= 0, "a norm >= 0 (0 disables clipping)"),
)


def _type_name(hint: Any) -> str:
    """A type as a user writes it: ``float``, ``int | None``, ``str | IntervalStrategy``."""
    if isinstance(hint, type):
        return hint.__name__
    return re.sub(r"\b(?:typing|transformers\.[\w.]+|builtins)\.", "", str(hint)).replace("NoneType", "None")


# Keys of the ``training:`` block that kd_trainer reads itself (transformers 5 has no such field).
# overwrite_output_dir: a run may write into a folder that already holds a run (see runner.preflight).
OWN_TRAINING_KEYS: dict[str, Any] = {"overwrite_output_dir": bool}


def validate_training_args(training: dict[str, Any]) -> None:
    """Check each key of the ``training:`` block against ``TrainingArguments``' fields and types
    (and :data:`OWN_TRAINING_KEYS`, which kd_trainer reads itself).

    ``TrainingArguments`` itself would raise a bare ``TypeError`` on an unknown key and accept
    a string where a float belongs until much later; here both fail at once, naming the key.
    """
    fields = {**_training_fields(), **OWN_TRAINING_KEYS}
    for key, value in list(training.items()):
        if value is False and "Strategy" in str(fields.get(key)):
            # YAML 1.1 reads an unquoted `no` as false: `eval_strategy: no` means the strategy "no".
            training[key] = value = "no"
        if key not in fields:
            raise ValueError(f"unknown TrainingArguments field 'training.{key}'.{did_you_mean(key, fields)}")
        if value is None or (key == "resume_from_checkpoint" and isinstance(value, bool)):
            continue  # resume_from_checkpoint: true means the latest checkpoint in output_dir
        try:
            coerced = TypeAdapter(fields[key]).validate_python(value, strict=False)
        except ValidationError as e:
            raise ValueError(f"'training.{key}' = {value!r} has the wrong type (expected {_type_name(fields[key])}): "
                             f"{e.errors()[0]['msg']}") from None
        except Exception:  # a type pydantic cannot build a validator for: let TrainingArguments judge it
            continue
        if isinstance(value, str) and isinstance(coerced, (int, float)) and not isinstance(coerced, bool):
            # YAML 1.1 reads `3e-4` (no dot) as a string: keep the number it names, as argparse would.
            training[key] = coerced
    for key, ok, expected in _RANGES:
        if key in training and training[key] is not None and not ok(training[key]):
            raise ValueError(f"'training.{key}' = {training[key]!r} is out of range: expected {expected}")
    if training.get("push_to_hub") and not training.get("hub_model_id"):
        raise ValueError("'training.push_to_hub' needs 'training.hub_model_id' (e.g. your-name/tinyclip-rstpreid-kd): "
                         "the student's open_clip folder is pushed there at the end of the run")
    if training.get("remove_unused_columns"):
        raise ValueError("'training.remove_unused_columns' must be false: images are decoded and captions "
                         "tokenised on the fly, so the raw columns must reach the transform")


def did_you_mean(key: str, valid: typing.Iterable[str]) -> str:
    """`` Did you mean a, b?`` with the closest valid names to ``key`` (empty when none is close)."""
    close = difflib.get_close_matches(key, list(valid), n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""
