"""Position embeddings trained at one size, used at another: the visual grid and the text length.

Foreign checkpoints are resized by :mod:`.rules` when only their position count differs from the
model's (e.g. TinyCLIP's 14x14 grid at 224x224 to 24x8 at 384x128); kd_trainer's own checkpoints
only when asked, since they were trained at the recipe's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_visual_positions(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """A ``(1 + H*W, D)`` visual position embedding on another grid: the class token is kept, the grid is
    resized bilinearly (``align_corners=False``, as IRRA's and timm's resize_pos_embed), row-major (H, W)
    as open_clip flattens the patch grid. Computed in float32, returned in ``pos``'s dtype."""
    (oh, ow), (nh, nw) = old_grid, new_grid
    grid = pos[1:].float().reshape(1, oh, ow, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(nh, nw), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(nh * nw, -1)
    return torch.cat([pos[:1].float(), grid]).to(pos.dtype)


def resize_text_positions(pos: torch.Tensor, length: int) -> torch.Tensor:
    """A ``(L, D)`` text position embedding for ``length`` tokens.

    Shorter: truncated. Text positions are absolute and the text tower is causal, so the first ``length``
    positions mean exactly what they meant in training, and the dropped ones could only hold tokens past
    the new end; interpolating would instead shift every position's meaning. Longer: linear interpolation
    over the whole sequence (``align_corners=True``, so the first and last positions are kept), since no
    trained embedding exists for the new positions; such a model needs fine-tuning to use them well.
    """
    if length <= pos.shape[0]:
        return pos[:length].clone()
    stretched = F.interpolate(pos.float().t()[None], size=length, mode="linear", align_corners=True)
    return stretched[0].t().contiguous().to(pos.dtype)
