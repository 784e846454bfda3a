"""kd_trainer: knowledge distillation of CLIP dual encoders for text-to-image person retrieval."""

__version__ = "0.1.0"
