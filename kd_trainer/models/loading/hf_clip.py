"""Hugging Face ``CLIPModel`` checkpoints, converted into the same open_clip dual encoder.

A ``save_pretrained`` folder (``config.json`` of ``model_type`` ``clip`` + ``model.safetensors`` or
``pytorch_model.bin``; sharded weights are not supported), or a bare state dict with its key names.
Separate q/k/v projections become one ``in_proj``, fc1/fc2 become c_fc/c_proj,
pre_layrnorm/post_layernorm become ln_pre/ln_post, projections are transposed, and the
``position_ids`` buffers (an ``arange`` the model rebuilds) are dropped.

One difference is not in the weights: HF pools the text tower at the first ``eos_token_id``
(at the argmax for configs with the legacy ``eos_token_id`` 2), open_clip at the highest token id.
They agree when EOS is the highest id in every sequence, as with CLIP's BPE tokenizer; for any other
model a warning says so when the folder is read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig

from kd_trainer.models.loading.errors import CheckpointError
from kd_trainer.models.loading.files import read_file
from kd_trainer.models.loading.source import Source, first_file

logger = logging.getLogger("kd_trainer")

HF_CLIP = "hf_clip"
HF_PREFIXES = ("vision_model.", "text_model.")
HF_CONFIG_NAME = "config.json"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_LEGACY_EOS = 2  # transformers pools at the argmax of the ids when eos_token_id is 2 (old CLIP configs)
RULE_HF_POSITION_IDS = "Hugging Face position_ids buffers (an arange the model rebuilds)"

_HF_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
# nn.Linear stores (out, in); open_clip's projections are (in, out) matrices applied as x @ proj.
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_HF_BLOCK_PARTS = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                   "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


def is_hf_clip_folder(folder: Path) -> bool:
    """A folder with a transformers ``config.json`` of ``model_type`` ``clip``."""
    try:
        return json.loads((folder / HF_CONFIG_NAME).read_text()).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False


def _hf_config(folder: Path) -> CLIPConfig:
    return CLIPConfig.from_pretrained(str(folder), local_files_only=True)


def _hf_mlp_ratio(c: Any, tower: str) -> float:
    ratio = c.intermediate_size / c.hidden_size
    if int(c.hidden_size * ratio) != c.intermediate_size:
        raise CheckpointError(f"HF {tower} intermediate_size {c.intermediate_size} is not expressible as "
                              f"open_clip's int(width * mlp_ratio) for width {c.hidden_size}.")
    return ratio


def hf_clip_architecture(config: CLIPConfig | str | os.PathLike) -> dict[str, Any]:
    """Our (open_clip) architecture dict for a transformers ``CLIPConfig``, or a folder holding its config.json.
    HF's ``quick_gelu`` is open_clip's ``quick_gelu=True``, its ``gelu`` open_clip's ``nn.GELU``; a
    layer_norm_eps other than open_clip's 1e-5 goes into ``norm_kwargs``."""
    if isinstance(config, (str, os.PathLike)):
        config = _hf_config(Path(config))
    v, t = config.vision_config, config.text_config
    acts = {v.hidden_act, t.hidden_act}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(f"HF CLIP activations {sorted(acts)}: open_clip supports one of quick_gelu/gelu "
                              "for both towers.")
    vision = {"layers": v.num_hidden_layers, "width": v.hidden_size, "patch_size": v.patch_size,
              "head_width": v.hidden_size // v.num_attention_heads, "mlp_ratio": _hf_mlp_ratio(v, "vision")}
    text = {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size, "width": t.hidden_size,
            "heads": t.num_attention_heads, "layers": t.num_hidden_layers, "mlp_ratio": _hf_mlp_ratio(t, "text")}
    for cfg, hf in ((vision, v), (text, t)):
        if hf.layer_norm_eps != 1e-5:
            cfg["norm_kwargs"] = {"eps": hf.layer_norm_eps}
    return {"embed_dim": config.projection_dim, "quick_gelu": acts == {"quick_gelu"},
            "image_size": [v.image_size, v.image_size], "vision_cfg": vision, "text_cfg": text}


def hf_clip_to_open_clip(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename a transformers ``CLIPModel`` state dict to open_clip's ``CLIP`` (q/k/v concatenated in
    nn.MultiheadAttention's q;k;v order). Returns the tensors and the keys dropped by a rule; keys no
    rule knows are kept as they are, to be reported as unexpected."""
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    qkv: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for k, v in sd.items():
        m = _HF_LAYER.match(k)
        if k.endswith("embeddings.position_ids"):
            dropped[k] = RULE_HF_POSITION_IDS
        elif k in _HF_NAMES:
            out[_HF_NAMES[k]] = v
        elif k in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[k]] = v.t().contiguous()
        elif m:
            _hf_block_key(k, m, v, out, qkv)
        else:
            out[k] = v
    for target, parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[target] = torch.cat([parts[x][1] for x in "qkv"])
        else:  # incomplete: keep the originals, so the load names them
            out.update(dict(parts.values()))
    return out, dropped


def _hf_block_key(key: str, m: re.Match, v: torch.Tensor, out: dict[str, torch.Tensor],
                  qkv: dict[str, dict[str, tuple[str, torch.Tensor]]]) -> None:
    """One key of an encoder layer: q/k/v parts are collected for concatenation, the rest renamed."""
    tower, idx, rest = m.groups()
    block = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{idx}."
    q = _HF_QKV.match(rest)
    if q:
        qkv.setdefault(f"{block}attn.in_proj_{q.group(2)}", {})[q.group(1)] = (key, v)
        return
    for hf, oc in _HF_BLOCK_PARTS.items():
        if rest.startswith(hf):
            out[block + oc + rest[len(hf):]] = v
            return
    out[key] = v


def hf_clip_source(sd: dict[str, torch.Tensor], path: Path) -> Source:
    """A bare state dict with ``CLIPModel`` key names (it does not say its architecture)."""
    return Source(HF_CLIP, path, *hf_clip_to_open_clip(sd))


def eos_pooling_warning(folder: Path, eos_token_id: int, vocab_size: int) -> str | None:
    """Why and when this model's text embeddings differ from HF's, or None when they never do.

    HF pools at the first ``eos_token_id`` (at the argmax for the legacy id 2); open_clip at the argmax.
    With EOS the highest id of the vocabulary the argmax is the first EOS, so the two agree."""
    if eos_token_id in (HF_LEGACY_EOS, vocab_size - 1):
        return None
    return (f"{str(folder)!r}: this Hugging Face CLIPModel pools text at the first eos_token_id ({eos_token_id}); "
            "the converted open_clip model pools at the highest token id in each sequence. Their text embeddings "
            f"differ for every caption holding an id above {eos_token_id} (ids run to {vocab_size - 1}). What to do: "
            "use the converted model only with a tokenizer whose EOS is the highest id of the vocabulary, as CLIP's "
            "BPE tokenizer (the one kd_trainer uses) is, or evaluate this model with transformers instead.")


def read_hf_folder(folder: Path, trusted: bool = False) -> Source:
    """A ``save_pretrained`` folder of ``CLIPModel``: config.json gives the architecture and image grid."""
    config = _hf_config(folder)
    file = first_file(folder, HF_WEIGHT_FILES, "a Hugging Face CLIPModel folder (sharded weights are not supported)")
    tensors, dropped = hf_clip_to_open_clip(read_file(file, trusted=trusted))
    v, t = config.vision_config, config.text_config
    g = v.image_size // v.patch_size
    notes = []
    warning = eos_pooling_warning(folder, t.eos_token_id, t.vocab_size)
    if warning is not None:
        logger.warning(warning)
        notes.append(f"text pooled at the highest token id, HF at eos_token_id {t.eos_token_id}: embeddings "
                     "differ unless EOS is the highest id in each sequence")
    return Source(HF_CLIP, folder, tensors, dropped, visual_grid=(g, g), arch=hf_clip_architecture(config),
                  notes=notes)
