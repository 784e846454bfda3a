"""Checkpoints of every supported format, loaded strictly into a :class:`RetrievalModel`.

    from kd_trainer.models.loading import ModelSpec, load_model, load_weights

    teacher = load_model("runs/teacher")                         # a kd_trainer run folder
    teacher = load_model("logs/RSTPReid/iira/best.pth")          # IRRA, with its configs.yaml beside it
    student = load_model(ModelSpec(checkpoint="tinyclip_yfcc15m_xsmall.pth", arch="tinyclip-xsmall",
                                   image_size=(384, 128), context_length=77, projection_dim=512))
    report = load_weights(model, "open_clip_folder/")            # into a model you built

One module per format (:mod:`.run_folder`, :mod:`.openclip`, :mod:`.openai`, :mod:`.tinyclip`,
:mod:`.irra`, :mod:`.hf_clip`), :mod:`.detect` to tell them apart, :mod:`.rules` for the strict
load and its :class:`LoadReport`, :mod:`.positions` and :mod:`.stride` for the two changes a load
may make to a model's shape, :mod:`.files` for reading bytes safely, :mod:`.load` for the entries.
"""

from kd_trainer.models.loading.detect import classify, read_source, read_state_dict
from kd_trainer.models.loading.errors import CheckpointError
from kd_trainer.models.loading.files import NOT_A_CHECKPOINT
from kd_trainer.models.loading.hf_clip import hf_clip_architecture, hf_clip_to_open_clip
from kd_trainer.models.loading.irra import IrraConfig, irra_architecture, irra_config_path, read_irra_config
from kd_trainer.models.loading.load import (
    ModelSpec,
    load_model,
    load_pretrained,
    load_weights,
    model_from_checkpoint,
    model_from_hf_clip,
    model_from_irra,
    model_from_open_clip,
)
from kd_trainer.models.loading.openclip import open_clip_architecture
from kd_trainer.models.loading.positions import resize_text_positions, resize_visual_positions
from kd_trainer.models.loading.rules import PROJECTION_PREFIXES, LoadReport, load_source
from kd_trainer.models.loading.run_folder import MODEL_CONFIG_NAME, WEIGHT_FILES, is_run_folder, model_config
from kd_trainer.models.loading.source import Source
from kd_trainer.models.loading.stride import apply_irra_stride, create_strided_model, irra_grid

__all__ = [
    "MODEL_CONFIG_NAME",
    "NOT_A_CHECKPOINT",
    "PROJECTION_PREFIXES",
    "WEIGHT_FILES",
    "CheckpointError",
    "IrraConfig",
    "LoadReport",
    "ModelSpec",
    "Source",
    "apply_irra_stride",
    "classify",
    "create_strided_model",
    "hf_clip_architecture",
    "hf_clip_to_open_clip",
    "irra_architecture",
    "irra_config_path",
    "irra_grid",
    "is_run_folder",
    "load_model",
    "load_pretrained",
    "load_source",
    "load_weights",
    "model_config",
    "model_from_checkpoint",
    "model_from_hf_clip",
    "model_from_irra",
    "model_from_open_clip",
    "open_clip_architecture",
    "read_irra_config",
    "read_source",
    "read_state_dict",
    "resize_text_positions",
    "resize_visual_positions",
]
