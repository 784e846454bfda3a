"""Ship a trained student as a plain open_clip model: a folder, and a push of that folder to the Hub.

    info = ModelCardInfo.from_run_dir("runs/clip_kd", license="mit", repo_id="me/clip-kd-rstpreid")
    export_open_clip(model, "exports/clip_kd", card=info)
    push_export_to_hub("exports/clip_kd", "me/clip-kd-rstpreid")

    # anyone, without kd_trainer:
    model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:me/clip-kd-rstpreid")
    tokenizer = open_clip.get_tokenizer("hf-hub:me/clip-kd-rstpreid")

The folder is open_clip's Hub layout (what ``factory.create_model`` reads for ``hf-hub:`` and
``local-dir:`` names):

* ``open_clip_config.json``       ``{"model_cfg": ..., "preprocess_cfg": ...}``;
* ``open_clip_model.safetensors`` the CLIP weights under open_clip's own key names;
* ``README.md``                   a model card;
* optionally ``recipe.yaml`` and ``test_results.json`` (written when the card carries them).

Why not open_clip's own ``push_to_hf_hub``: it replaces any tokenizer that is not an
``HFTokenizer`` with ``openai/clip-vit-large-patch14``'s (downloaded), saves that next to the
weights and so changes how captions are tokenised; it also ``torch.save``-s a pickle copy and
uploads a whole temporary folder. Here the folder is written by us and exactly a fixed list of
files is uploaded in one commit.

open_clip details the layout depends on (open_clip 3.3):

* ``preprocess_cfg.resize_mode`` must be ``"squash"``: the default ``"shortest"`` resizes the short
  side (keeping the aspect ratio, bicubic for non-square targets regardless of ``interpolation``)
  and centre-crops, which for a tall person crop is not IRRA's plain ``Resize((H, W))``.
  ``"squash"`` is ``Resize((H, W), interpolation)``, bilinear here, as IRRA.
* ``vision_cfg.image_size`` is ``[H, W]``; open_clip keeps the list as is (``to_2tuple`` passes
  iterables through), builds the ``(H/p, W/p)`` position grid from it and copies it into the
  preprocess ``size`` at load time, so the eval transform resizes to exactly ``(H, W)``.
* ``get_tokenizer`` uses the bundled CLIP BPE ``SimpleTokenizer`` only when ``text_cfg`` has no
  (non-empty) ``hf_tokenizer_name``; the config written here never has one, nor
  ``tokenizer_kwargs`` (``clean='lower'``, open_clip's default, is what kd_trainer tokenises with).
* ``local-dir:`` loads the first weight file by a preference list in which
  ``open_clip_model.safetensors`` comes first, so exporting into a run folder that also holds
  ``model.safetensors`` or ``*.pth`` still loads the export. Loading is ``strict=True``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import huggingface_hub
import open_clip
import safetensors.torch
import torch
import yaml
from huggingface_hub import CommitOperationAdd
from open_clip.transformer import QuickGELU

from kd_trainer.data.transforms import CLIP_MEAN, CLIP_STD
from kd_trainer.models.factory import RetrievalModel, get_architecture
from kd_trainer.models.onnx import IMAGE_ENCODER, PREPROCESS_FILE, TEXT_ENCODER, format_export_report

logger = logging.getLogger("kd_trainer")

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CARD_FILE",
    "RECIPE_FILE",
    "RESULTS_FILE",
    "REQUIRED_FILES",
    "OPTIONAL_FILES",
    "ModelCardInfo",
    "open_clip_config",
    "open_clip_state_dict",
    "render_model_card",
    "update_model_card",
    "export_open_clip",
    "hub_upload_plan",
    "push_export_to_hub",
]

# open_clip's names (open_clip.constants.HF_CONFIG_NAME / HF_SAFE_WEIGHTS_NAME).
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
CARD_FILE = "README.md"
RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "test_results.json"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
OPTIONAL_FILES = (RECIPE_FILE, RESULTS_FILE)
# Where `kd-trainer export-onnx` puts its section in a card, so a second export replaces it.
CARD_START = "<!-- kd_trainer:onnx-export:start -->"
CARD_END = "<!-- kd_trainer:onnx-export:end -->"

DEFAULT_TAGS = ("clip", "open_clip", "knowledge-distillation", "person-retrieval", "text-to-image-retrieval")
# (label in the card, metric key without the "test_" prefix)
CARD_METRICS = (("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("mAP", "mAP"), ("mINP", "mINP"))
# text_cfg / vision_cfg keys that would make open_clip build something other than the plain CLIP
# we export (an HF text tower, a timm image tower) or tokenise with something other than CLIP BPE.
_FOREIGN_KEYS = {
    "text_cfg": ("hf_tokenizer_name", "hf_model_name", "tokenizer_kwargs", "tokenizer_mode"),
    "vision_cfg": ("timm_model_name",),
}


@dataclass
class ModelCardInfo:
    """What the model card says about a student: where it came from and how well it does.

    ``dataset`` is the display name (``rstpreid``); ``datasets`` are Hub dataset ids for the card's
    metadata, given only when known (a wrong id links to someone else's data). ``metrics`` takes
    the keys of ``test_results.json`` (``test_r1`` ...) or the same without ``test_``, in %.
    ``recipe_yaml`` (the run's recipe, verbatim) is shown in the card and written as ``recipe.yaml``;
    non-empty ``metrics`` are also written as ``test_results.json``, so the Hub repo carries them
    as data and not only as a table.
    """

    recipe_name: str
    method: str | None = None
    teacher: str | None = None
    dataset: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    recipe_yaml: str | None = None
    license: str | None = None
    repo_id: str | None = None
    datasets: list[str] = field(default_factory=list)
    base_model: str | None = None
    tags: list[str] = field(default_factory=list)
    description: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelCardInfo":
        """Build from a plain dict (e.g. parsed from a CLI or JSON); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown model card keys {unknown}; valid keys: {sorted(known)}.")
        if "recipe_name" not in data:
            raise ValueError("A model card needs at least 'recipe_name'.")
        return cls(**dict(data))

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike, **overrides: Any) -> "ModelCardInfo":
        """Read a finished run folder (``recipe.yaml``, ``test_results.json``) into card info.

        Fills ``recipe_name`` (recipe ``name``), ``method``, ``dataset`` (``data.name``),
        ``teacher`` (``teacher.arch``), ``metrics`` and ``recipe_yaml``; ``overrides`` win, which is
        where ``license``, ``repo_id``, ``datasets`` or ``base_model`` come in.
        """
        folder = Path(run_dir)
        recipe_path, results_path = folder / RECIPE_FILE, folder / RESULTS_FILE
        recipe_text = recipe_path.read_text() if recipe_path.is_file() else None
        recipe = (yaml.safe_load(recipe_text) or {}) if recipe_text else {}
        data = recipe.get("data") or {}
        teacher = recipe.get("teacher") or {}
        values: dict[str, Any] = {
            "recipe_name": recipe.get("name") or folder.name,
            "method": recipe.get("method"),
            "dataset": data.get("name") if isinstance(data, dict) else None,
            "teacher": teacher.get("arch") if isinstance(teacher, dict) else None,
            "metrics": json.loads(results_path.read_text()) if results_path.is_file() else {},
            "recipe_yaml": recipe_text,
        }
        values.update(overrides)
        return cls.from_dict(values)


# ----------------------------------------------------------------------------------------------
# config and weights


def _clip_mean_std() -> tuple[list[float], list[float]]:
    return list(CLIP_MEAN), list(CLIP_STD)


def _uses_quick_gelu(clip: torch.nn.Module) -> bool:
    """Whether the built model runs QuickGELU: read from its modules, since the weights were
    trained with whatever activation the model really had, whatever a config file claims."""
    return any(isinstance(m, QuickGELU) for m in clip.modules())


def open_clip_config(model: RetrievalModel) -> dict[str, Any]:
    """The ``open_clip_config.json`` content for ``model``: ``{"model_cfg", "preprocess_cfg"}``.

    ``model_cfg`` is the architecture with the model's actual ``image_size`` ``[H, W]`` and
    ``context_length``; ``preprocess_cfg`` makes open_clip's eval transform IRRA's evaluation
    transform: bilinear ``Resize((H, W))`` (``resize_mode="squash"``), ToTensor, CLIP mean/std.
    """
    if getattr(model, "arch", None) is None:
        raise ValueError("The model has no `arch` (architecture name or dict), so its open_clip config "
                         "cannot be written; build it with kd_trainer.models.create_model or set `model.arch`.")
    clip = model.clip
    stride, kernel = tuple(clip.visual.conv1.stride), tuple(clip.visual.conv1.kernel_size)
    if stride != kernel:
        raise ValueError(f"The image tower patchifies with stride {stride} != patch size {kernel} (an IRRA-style "
                         "overlapping-patch model); open_clip's VisionTransformer has no stride option, so this "
                         "model cannot be exported in open_clip's layout.")
    cfg = get_architecture(model.arch)
    cfg.pop("image_size", None)  # ours; open_clip reads vision_cfg.image_size
    for section, keys in _FOREIGN_KEYS.items():
        found = [k for k in keys if k in cfg.get(section, {})]
        if found:
            raise ValueError(f"Architecture {section} has {found}: the export is a plain open_clip CLIP tokenised "
                             "with CLIP BPE, and these keys would make open_clip build or tokenise differently.")
    h, w = (int(s) for s in model.image_size)
    vision_cfg = {**cfg["vision_cfg"], "image_size": [h, w]}
    text_cfg = {**cfg["text_cfg"], "context_length": int(model.context_length)}
    model_cfg = {
        "embed_dim": int(model.embed_dim),
        "quick_gelu": _uses_quick_gelu(clip),
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    # any further open_clip CLIP arguments the architecture sets (cast_dtype is a runtime choice)
    for key, value in cfg.items():
        if key not in model_cfg and key not in ("cast_dtype", "_doc"):
            model_cfg[key] = value
    mean, std = _clip_mean_std()
    preprocess_cfg = {
        "size": [h, w],
        "mode": "RGB",
        "mean": mean,
        "std": std,
        "interpolation": "bilinear",
        "resize_mode": "squash",
        "fill_color": 0,
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def open_clip_state_dict(model: RetrievalModel) -> dict[str, torch.Tensor]:
    """The CLIP weights as open_clip names them (``model.clip``'s own keys: no ``clip.`` prefix, no
    ``image_proj``/``text_proj``), as standalone contiguous CPU tensors.

    Every tensor is cloned: safetensors refuses tensors that share storage (tied weights, views),
    and open_clip loads ``strict=True``, so dropping a shared key instead (``save_model``'s way)
    would make the file unloadable there.
    """
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.clip.state_dict().items()}


def _check_config_matches(model_cfg: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Build the configured CLIP on the meta device (no memory, no init cost) and compare its keys
    and shapes with the weights, so a config that open_clip would fail to load (strictly) is caught
    here, not by whoever downloads the model."""
    cfg = json.loads(json.dumps(model_cfg))  # a deep copy, as the JSON open_clip will read
    quick_gelu = bool(cfg.pop("quick_gelu", False))
    with torch.device("meta"):
        ref = open_clip.CLIP(**cfg, quick_gelu=quick_gelu)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or reshaped:
        raise ValueError(f"The open_clip config does not describe the model's weights: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, reshaped {[(k, got[k], expected[k]) for k in reshaped[:8]]}.")


# ----------------------------------------------------------------------------------------------
# model card


def _metric(metrics: Mapping[str, Any], key: str) -> float | None:
    for name in (f"test_{key}", key):
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _front_matter(info: ModelCardInfo) -> str:
    meta: dict[str, Any] = {"library_name": "open_clip"}
    if info.license:
        meta["license"] = info.license
    tags = list(dict.fromkeys([*DEFAULT_TAGS, *info.tags]))
    meta["tags"] = tags
    if info.datasets:
        meta["datasets"] = list(info.datasets)
    if info.base_model:
        meta["base_model"] = info.base_model
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def render_model_card(info: ModelCardInfo, config: Mapping[str, Any]) -> str:
    """The README.md text: front matter for the Hub, then recipe, teacher, data, metrics and
    how to load and use the model (the input size and tokenizer matter: the model was trained
    on ``(H, W)`` person crops and CLIP BPE captions, and nothing else gives its numbers)."""
    model_cfg, pp = config["model_cfg"], config["preprocess_cfg"]
    h, w = pp["size"]
    vis, txt = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    ctx = txt.get("context_length", 77)
    repo = info.repo_id or "<namespace>/<repo>"
    title = info.repo_id.split("/")[-1] if info.repo_id else info.recipe_name
    lines = [_front_matter(info), f"# {title}", ""]
    lines.append(info.description or
                 "A CLIP dual encoder for text-to-image person retrieval, "
                 + ("distilled from a larger teacher" if info.teacher else "trained")
                 + " with kd_trainer and saved in open_clip's format.")
    lines += [
        "",
        "## Training",
        "",
        f"- Recipe: `{info.recipe_name}`",
        f"- Method: {info.method or info.recipe_name}",
        f"- Teacher: {info.teacher or 'none (no distillation)'}",
        f"- Dataset: {info.dataset or 'not given'}",
        f"- Architecture: open_clip ViT CLIP, embed dim {model_cfg['embed_dim']}; image tower: layers "
        f"{vis.get('layers')}, width {vis.get('width')}, patch {vis.get('patch_size')}; text tower: layers "
        f"{txt.get('layers')}, width {txt.get('width')}",
        f"- Input: {h}x{w} (height x width) RGB, context length {ctx}",
        "",
        "## Test results",
        "",
    ]
    values = {label: _metric(info.metrics, key) for label, key in CARD_METRICS}
    if any(v is not None for v in values.values()):
        where = f" on the {info.dataset} test split" if info.dataset else ""
        lines += [f"Text-to-image retrieval{where}, in %.", "",
                  "| " + " | ".join(values) + " |",
                  "|" + "---:|" * len(values),
                  "| " + " | ".join("–" if v is None else f"{v:.2f}" for v in values.values()) + " |"]
    else:
        lines.append("No test results were given.")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import open_clip",
        "import torch",
        "from PIL import Image",
        "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo}")',
        f'tokenizer = open_clip.get_tokenizer("hf-hub:{repo}")',
        "# or, from a downloaded copy of this folder:",
        '# model, _, preprocess = open_clip.create_model_and_transforms("local-dir:/path/to/folder")',
        '# tokenizer = open_clip.get_tokenizer("local-dir:/path/to/folder")',
        "model.eval()",
        "",
        'image = preprocess(Image.open("person.jpg").convert("RGB")).unsqueeze(0)',
        'text = tokenizer(["a woman in a red coat carrying a black bag"])',
        "with torch.no_grad():",
        "    image_features = model.encode_image(image, normalize=True)",
        "    text_features = model.encode_text(text, normalize=True)",
        "similarity = text_features @ image_features.T  # rank gallery images per caption",
        "```",
        "",
        f"- Use the third value returned (the evaluation transform): it resizes to exactly {h}x{w} "
        "(bilinear, no crop) and normalises with the CLIP mean/std, as in training. The second "
        "(open_clip's training transform) random-resized-crops and is not what the model was trained with.",
        "- Convert images to RGB before `preprocess`: open_clip resizes before converting the mode, so "
        "palette images would be resized with nearest-neighbour.",
        f"- The tokenizer is CLIP's BPE (open_clip's `SimpleTokenizer`, lower-cased), context length {ctx}; "
        "nothing is downloaded for it.",
        f"- The position embeddings are for {h}x{w} inputs; other sizes need `force_image_size` and give "
        "different results from those above.",
    ]
    if info.recipe_yaml:
        lines += ["", "## Recipe", "", "<details><summary>recipe.yaml</summary>", "", "```yaml",
                  info.recipe_yaml.rstrip("\n"), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def update_model_card(card: str | os.PathLike, report: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Put the export's section into a model card (``README.md``): replaced when the card already has
    one (between the kd_trainer:onnx-export markers), appended otherwise."""
    path = Path(card)
    text = path.read_text() if path.is_file() else ""
    section = (f"{CARD_START}\n## ONNX export\n\nGraphs in `{out_dir}` (`{IMAGE_ENCODER}`, `{TEXT_ENCODER}`, "
               f"`{PREPROCESS_FILE}`), written and checked by `kd-trainer export-onnx`.\n\n"
               f"{format_export_report(report)}\n{CARD_END}\n")
    if CARD_START in text and CARD_END in text:
        head, rest = text.split(CARD_START, 1)
        text = head + section + rest.split(CARD_END, 1)[1].lstrip("\n")
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + section
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# export


def export_open_clip(
    model: RetrievalModel,
    out_dir: str | os.PathLike,
    *,
    card: ModelCardInfo | Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``model`` as an open_clip Hub folder; returns the paths written, in upload order.

    Writes ``open_clip_config.json``, ``open_clip_model.safetensors`` (``model.clip`` only: the
    training-only ``image_proj``/``text_proj`` are not part of the deployable dual encoder) and
    ``README.md``; plus ``recipe.yaml`` / ``test_results.json`` when the card carries a recipe /
    metrics. The config is checked against the weights before anything is written.
    """
    if card is None:
        arch = model.arch if isinstance(model.arch, str) else "student"
        info = ModelCardInfo(recipe_name=str(arch))
    elif isinstance(card, ModelCardInfo):
        info = card
    else:
        info = ModelCardInfo.from_dict(card)

    config = open_clip_config(model)
    tensors = open_clip_state_dict(model)
    _check_config_matches(config["model_cfg"], tensors)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    path = out / CONFIG_FILE
    path.write_text(json.dumps(config, indent=2) + "\n")
    written.append(path)

    path = out / WEIGHTS_FILE
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    written.append(path)

    path = out / CARD_FILE
    path.write_text(render_model_card(info, config))
    written.append(path)

    if info.recipe_yaml:
        path = out / RECIPE_FILE
        path.write_text(info.recipe_yaml if info.recipe_yaml.endswith("\n") else info.recipe_yaml + "\n")
        written.append(path)
    if info.metrics:
        path = out / RESULTS_FILE
        path.write_text(json.dumps(info.metrics, indent=2) + "\n")
        written.append(path)
    logger.info("Exported open_clip model to %s (%s)", out, ", ".join(p.name for p in written))
    return written


# ----------------------------------------------------------------------------------------------
# Hub


def hub_upload_plan(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """``(local path, path_in_repo)`` for exactly the files to upload from an export folder.

    A fixed allow-list, not a folder walk: the three export files (required) and ``recipe.yaml`` /
    ``test_results.json`` when present. Anything else in the folder (checkpoints, optimizer
    state, a teacher's weights, logs) is never uploaded, even if the export went into a run folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Export folder not found: {root}")
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not an open_clip export: it lacks {missing} "
                                "(write it with kd_trainer.models.export.export_open_clip).")
    names = [*REQUIRED_FILES, *(n for n in OPTIONAL_FILES if (root / n).is_file())]
    return [(str(root / name), name) for name in names]


def push_export_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload kd_trainer student (open_clip format)",
    revision: str | None = None,
    api: Any | None = None,
) -> str:
    """Create the model repo (if missing) and upload :func:`hub_upload_plan` in one commit.

    ``api`` is an ``huggingface_hub.HfApi`` (made from ``token`` when not given); passing another
    object with ``create_repo``/``create_branch``/``create_commit`` lets tests run without network.
    A ``revision`` other than ``main`` is created as a branch first (the Hub refuses commits to a
    missing branch). Returns the commit URL (or the repo id when the API gives none).
    """
    plan = hub_upload_plan(folder)
    if api is None:
        api = huggingface_hub.HfApi(token=token)  # looked up at call time (tests may stand in for it)
    repo_url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    # the Hub may complete an owner-less id ("name" -> "user/name")
    resolved = getattr(repo_url, "repo_id", None) or repo_id
    if revision is not None and revision != "main":
        api.create_branch(resolved, branch=revision, token=token, repo_type="model", exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=local) for local, in_repo in plan]
    info = api.create_commit(
        resolved,
        operations,
        commit_message=commit_message,
        token=token,
        repo_type="model",
        revision=revision,
    )
    return str(getattr(info, "commit_url", None) or resolved)
