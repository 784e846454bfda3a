"""The recipe layer: the YAML schema of a run (:mod:`.schema`: one recipe type per task, chosen by
``task:``), reading it with its overrides (:mod:`.loading`), its weight schedules (:mod:`.schedules`),
parsed once and validated before anything is built."""

from kd_trainer.recipe.loading import apply_overrides, dump_recipe, load_recipe, parse_recipe
from kd_trainer.recipe.mimic import MimicConfig, MimicJob, parse_mimic_config
from kd_trainer.recipe.optim import IRRA, OptimConfig, OptimSettings
from kd_trainer.recipe.schema import (
    RECIPE_TYPES,
    ClassificationRecipe,
    DataConfig,
    DetDataConfig,
    DetectionRecipe,
    LossConfig,
    ModelConfig,
    Recipe,
    RecipeError,
    RetrievalRecipe,
    SelectConfig,
    ShapesConfig,
    ShapesDataConfig,
    StageConfig,
    SynthConfig,
    SynthDetConfig,
    TermConfig,
    Trainable,
    validate_training_args,
)

__all__ = [
    "IRRA", "MimicConfig", "MimicJob", "OptimConfig", "OptimSettings", "parse_mimic_config",
    "RECIPE_TYPES", "ClassificationRecipe", "DataConfig", "DetDataConfig", "DetectionRecipe", "LossConfig",
    "ModelConfig", "Recipe", "RecipeError", "RetrievalRecipe", "SelectConfig", "ShapesConfig", "ShapesDataConfig",
    "StageConfig", "SynthConfig", "SynthDetConfig", "TermConfig", "Trainable", "apply_overrides", "dump_recipe",
    "load_recipe", "parse_recipe", "validate_training_args",
]
