"""The recipe layer: the YAML schema of a run (:mod:`.schema`), its weight schedules
(:mod:`.schedules`), parsed once and validated before anything is built."""

from kd_trainer.recipe.schema import (
    DataConfig,
    LossConfig,
    ModelConfig,
    Recipe,
    RecipeError,
    ShapesConfig,
    StageConfig,
    SynthConfig,
    TermConfig,
    Trainable,
    apply_overrides,
    dump_recipe,
    load_recipe,
    parse_recipe,
    validate_training_args,
)

__all__ = [
    "DataConfig", "LossConfig", "ModelConfig", "Recipe", "RecipeError", "ShapesConfig", "StageConfig",
    "SynthConfig", "TermConfig", "Trainable", "apply_overrides", "dump_recipe", "load_recipe", "parse_recipe",
    "validate_training_args",
]
