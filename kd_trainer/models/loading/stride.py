"""Models whose patches stride by less than their size, as IRRA's ViT does with ``stride_size``.

open_clip always strides by the patch size, but nothing in its forward pass depends on that, so
setting the patch convolution's stride and the position grid is exact. Used for IRRA checkpoints
and for kd_trainer folders of such a model (``stride_size`` in ``kd_trainer_model.json``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_trainer.models.factory import RetrievalModel, create_model, get_architecture
from kd_trainer.models.loading.errors import CheckpointError


def irra_grid(img_size: tuple[int, int], patch_size: int, stride_size: int) -> tuple[int, int]:
    """IRRA's patch grid (num_y, num_x): ``(size - patch) // stride + 1`` per side, as its VisionTransformer
    computes it; with stride < patch the patches overlap, and a remainder of the image is never seen."""
    h, w = img_size
    grid = ((h - patch_size) // stride_size + 1, (w - patch_size) // stride_size + 1)
    if min(grid) < 1 or stride_size < 1:
        raise CheckpointError(f"IRRA img_size {img_size} with patch {patch_size} and stride {stride_size} "
                              "gives no patches.")
    return grid


def apply_irra_stride(model: RetrievalModel, stride_size: int) -> list[str]:
    """Give ``model`` IRRA's patch embedding: stride ``stride_size`` (overlapping patches below the patch size)
    and the grid IRRA computes at the model's image size. Returns notes for the report; a new positional
    embedding (when the grid changes) is filled by the load that follows."""
    visual = model.clip.visual
    kh, kw = visual.conv1.kernel_size
    if kh != kw:
        raise CheckpointError(f"IRRA's patches are square, but the model's patch is {kh}x{kw}.")
    grid = irra_grid(model.image_size, kh, stride_size)
    notes = []
    if tuple(visual.conv1.stride) != (stride_size, stride_size):
        visual.conv1.stride = (stride_size, stride_size)
        notes.append(f"patch stride set to {stride_size} (IRRA stride_size; patch {kh})")
    if tuple(visual.grid_size) != grid:
        visual.grid_size = grid
        pos = visual.positional_embedding
        visual.positional_embedding = nn.Parameter(pos.new_zeros(grid[0] * grid[1] + 1, pos.shape[1]))
        notes.append(f"position grid set to {grid[0]}x{grid[1]} (IRRA: (size - patch) // stride + 1)")
    return notes


def create_strided_model(arch: str | dict[str, Any], image_size: tuple[int, int], stride_size: int, *,
                         context_length: int | None = None, projection_dim: int | None = None) -> RetrievalModel:
    """A model with IRRA's patch stride at IRRA's image size (which need not be a multiple of the patch).
    open_clip sizes its grid as image // patch, so the model is built at the size that gives IRRA's grid
    and then given the true image size and stride."""
    patch = get_architecture(arch)["vision_cfg"].get("patch_size", 16)
    patch = patch if isinstance(patch, int) else patch[0]
    ny, nx = irra_grid(image_size, patch, stride_size)
    model = create_model(arch, image_size=(ny * patch, nx * patch), context_length=context_length,
                         projection_dim=projection_dim)
    model.clip.visual.image_size = (int(image_size[0]), int(image_size[1]))
    apply_irra_stride(model, stride_size)
    return model
