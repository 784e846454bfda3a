"""Exporting a student as an open_clip model and pushing it: all offline, on the ``micro`` arch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms as T

from kd_trainer.data.tokenizer import tokenize
from kd_trainer.data.transforms import CLIP_MEAN, CLIP_STD, build_image_transform
from kd_trainer.models.export import (
    ModelCardInfo,
    export_open_clip,
    hub_upload_plan,
    push_export_to_hub,
)
from kd_trainer.models.factory import create_model

SIZE = (32, 16)  # (H, W): non-square on purpose
REPO = "acme/micro-student"
BASE_FILES = ["open_clip_config.json", "open_clip_model.safetensors", "README.md"]
CAPTIONS = [
    "A woman in a red coat carrying a black bag.",
    "the man wears a blue shirt, grey trousers and white sneakers " * 6,  # longer than 77 tokens
    "",
]
METRICS = {"test_r1": 61.25, "test_r5": 80.5, "test_r10": 87.125, "test_mAP": 48.0, "test_mINP": 25.75,
           "test_hybrid_image_r1": 1.0}
RECIPE = "name: clip_kd\nmethod: CLIP-KD (fd + icl + crd)\ndata:\n  name: rstpreid\nteacher:\n  arch: clip-vit-b16\n"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing here may reach the network: huggingface_hub refuses HTTP while this is set (its
    constant is read at import, so patch it too), for these tests only."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _card(**kw: Any) -> ModelCardInfo:
    values = dict(recipe_name="clip_kd", method="CLIP-KD (fd + icl + crd)", teacher="clip-vit-b16",
                  dataset="rstpreid", metrics=dict(METRICS), recipe_yaml=RECIPE, license="mit", repo_id=REPO,
                  datasets=["acme/rstpreid"], base_model="wkcn/TinyCLIP-ViT-8M-16-Text-3M-YFCC15M")
    values.update(kw)
    return ModelCardInfo(**values)


def _seeded_model(seed: int, **kw: Any):
    torch.manual_seed(seed)
    model = create_model("micro", image_size=SIZE, **kw).eval()
    with torch.no_grad():  # move logit_scale etc. off their defaults so a missed key would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[None, 64], ids=["plain", "with_projections"])
def exported(request, tmp_path_factory):
    model = _seeded_model(0, projection_dim=request.param)
    out = tmp_path_factory.mktemp("export")
    written = export_open_clip(model, out)
    return model, out, written


@pytest.fixture(scope="module")
def exported_with_card(tmp_path_factory):
    model = _seeded_model(1)
    out = tmp_path_factory.mktemp("export_card")
    written = export_open_clip(model, out, card=_card())
    return model, out, written


def _load(folder: Path):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess


# ---------------------------------------------------------------------------------------------
# folder contents


def test_export_writes_open_clip_layout(exported):
    model, out, written = exported
    assert [p.name for p in written] == BASE_FILES
    assert all(p.parent == out and p.is_file() for p in written)
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert set(cfg) == {"model_cfg", "preprocess_cfg"}
    mc, pp = cfg["model_cfg"], cfg["preprocess_cfg"]
    assert mc["embed_dim"] == 32 and mc["quick_gelu"] is True
    assert mc["vision_cfg"]["image_size"] == [32, 16]
    assert mc["text_cfg"]["context_length"] == 77
    assert "hf_tokenizer_name" not in mc["text_cfg"] and "tokenizer_kwargs" not in mc["text_cfg"]
    assert "image_size" not in mc  # kd_trainer's own key stays out of open_clip's CLIP(**model_cfg)
    assert pp["size"] == [32, 16] and pp["interpolation"] == "bilinear" and pp["resize_mode"] == "squash"
    assert pp["mean"] == pytest.approx(CLIP_MEAN) and pp["std"] == pytest.approx(CLIP_STD)


def test_weights_are_open_clip_keys_without_projections(exported):
    model, out, _ = exported
    tensors = load_file(str(out / "open_clip_model.safetensors"))
    assert set(tensors) == set(model.clip.state_dict())
    assert not any(k.startswith(("clip.", "image_proj.", "text_proj.")) for k in tensors)
    for k, v in model.clip.state_dict().items():
        assert torch.equal(tensors[k], v), k


# ---------------------------------------------------------------------------------------------
# reload through open_clip alone


def test_local_dir_reload_gives_identical_embeddings(exported):
    model, out, _ = exported
    loaded, _ = _load(out)
    assert type(loaded) is open_clip.CLIP
    assert tuple(loaded.visual.image_size) == SIZE
    torch.manual_seed(2)
    images = torch.randn(3, 3, *SIZE)
    ids = tokenize(CAPTIONS, context_length=model.context_length)
    with torch.no_grad():
        for normalize in (False, True):
            torch.testing.assert_close(loaded.encode_image(images, normalize=normalize),
                                       model.encode_image(images, normalize=normalize), atol=1e-6, rtol=0)
            torch.testing.assert_close(loaded.encode_text(ids, normalize=normalize),
                                       model.encode_text(ids, normalize=normalize), atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded.logit_scale, model.clip.logit_scale, atol=0, rtol=0)


def test_eval_transform_is_irra_resize_to_hw_with_clip_mean_std(exported):
    _, out, _ = exported
    _, preprocess = _load(out)
    steps = preprocess.transforms
    resize = next(t for t in steps if isinstance(t, T.Resize))
    assert list(resize.size) == [32, 16]
    assert resize.interpolation == T.InterpolationMode.BILINEAR
    assert not any(isinstance(t, (T.CenterCrop, T.RandomResizedCrop)) for t in steps)
    norm = next(t for t in steps if isinstance(t, T.Normalize))
    assert tuple(norm.mean) == pytest.approx(CLIP_MEAN) and tuple(norm.std) == pytest.approx(CLIP_STD)
    # and it computes the same tensor as kd_trainer's evaluation transform, on a tall and a wide image
    rng = np.random.default_rng(0)
    irra = build_image_transform(SIZE, train=False)
    for shape in ((77, 29, 3), (20, 50, 3)):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        got = preprocess(image)
        assert got.shape == (3, 32, 16)
        torch.testing.assert_close(got, irra(image), atol=1e-6, rtol=0)


def test_tokenizer_is_clip_bpe_at_the_model_context_length(tmp_path):
    model = _seeded_model(3, context_length=16)  # a non-default length must travel with the export
    export_open_clip(model, tmp_path)
    tok = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    assert type(tok) is open_clip.tokenizer.SimpleTokenizer
    assert tok.context_length == 16
    assert torch.equal(tok(CAPTIONS), tokenize(CAPTIONS, context_length=16))
    loaded, _ = _load(tmp_path)
    assert loaded.context_length == 16
    with torch.no_grad():
        ids = tok(CAPTIONS)
        torch.testing.assert_close(loaded.encode_text(ids, normalize=True),
                                   model.encode_text(ids, normalize=True), atol=1e-6, rtol=0)


def test_hf_hub_name_loads_from_an_offline_cache(exported_with_card, tmp_path):
    """The card's ``hf-hub:`` snippet, against a Hub cache holding the uploaded files (offline)."""
    model, out, _ = exported_with_card
    repo_dir = tmp_path / f"models--{REPO.replace('/', '--')}"
    sha = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    snapshot = repo_dir / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for local, in_repo in hub_upload_plan(out):
        shutil.copy(local, snapshot / in_repo)
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"hf-hub:{REPO}", cache_dir=str(tmp_path))
    tok = open_clip.get_tokenizer(f"hf-hub:{REPO}", cache_dir=str(tmp_path))
    assert type(tok) is open_clip.tokenizer.SimpleTokenizer
    ids = tok(CAPTIONS)
    assert torch.equal(ids, tokenize(CAPTIONS, context_length=77))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_text(ids, normalize=True),
                                   model.encode_text(ids, normalize=True), atol=1e-6, rtol=0)
    assert list(next(t for t in preprocess.transforms if isinstance(t, T.Resize)).size) == [32, 16]


def test_tied_tensors_are_saved_and_reload(tmp_path):
    model = _seeded_model(4)
    model.clip.visual.proj = model.clip.text_projection  # both 32x32 in micro: one shared tensor
    export_open_clip(model, tmp_path)
    loaded, _ = _load(tmp_path)
    images = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images, normalize=True),
                                   model.encode_image(images, normalize=True), atol=1e-6, rtol=0)


def test_refuses_what_open_clip_cannot_rebuild(tmp_path):
    model = _seeded_model(5)
    model.clip.visual.conv1.stride = (4, 4)  # IRRA-style overlapping patches
    with pytest.raises(ValueError, match="stride"):
        export_open_clip(model, tmp_path / "strided")
    model = _seeded_model(5)
    model.arch = None
    with pytest.raises(ValueError, match="arch"):
        export_open_clip(model, tmp_path / "no_arch")
    model = _seeded_model(5)
    model.arch = "tiny-student"  # a config that does not describe these weights
    with pytest.raises(ValueError, match="does not describe"):
        export_open_clip(model, tmp_path / "wrong_arch")
    assert not (tmp_path / "wrong_arch").exists()  # checked before anything is written


# ---------------------------------------------------------------------------------------------
# model card


def test_card_front_matter_metrics_and_usage(exported_with_card):
    _, out, written = exported_with_card
    assert [p.name for p in written] == [*BASE_FILES, "recipe.yaml", "test_results.json"]
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "open_clip" and meta["license"] == "mit"
    assert {"clip", "knowledge-distillation", "person-retrieval"} <= set(meta["tags"])
    assert meta["datasets"] == ["acme/rstpreid"]
    assert meta["base_model"] == "wkcn/TinyCLIP-ViT-8M-16-Text-3M-YFCC15M"
    for needle in ("clip_kd", "CLIP-KD (fd + icl + crd)", "clip-vit-b16", "rstpreid",
                   "| R@1 | R@5 | R@10 | mAP | mINP |", "| 61.25 | 80.50 | 87.12 | 48.00 | 25.75 |",
                   f'open_clip.create_model_and_transforms("hf-hub:{REPO}")',
                   f'open_clip.get_tokenizer("hf-hub:{REPO}")', "local-dir:", "32x16"):
        assert needle in text, needle
    assert RECIPE.strip() in text
    assert (out / "recipe.yaml").read_text() == RECIPE
    assert json.loads((out / "test_results.json").read_text()) == METRICS


def test_card_accepts_unprefixed_metric_keys_and_dicts(tmp_path):
    model = _seeded_model(6)
    card = {"recipe_name": "ours_3stage", "metrics": {"r1": 1.5, "r5": 2.0, "r10": 3.0, "mAP": 4.0}}
    written = export_open_clip(model, tmp_path, card=card)
    text = (tmp_path / "README.md").read_text()
    assert "| 1.50 | 2.00 | 3.00 | 4.00 | – |" in text
    assert "license" not in yaml.safe_load(text.split("---\n")[1])
    assert [p.name for p in written] == [*BASE_FILES, "test_results.json"]
    with pytest.raises(ValueError, match="Unknown model card keys"):
        ModelCardInfo.from_dict({"recipe_name": "x", "licence": "mit"})


def test_card_info_from_run_dir(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "test_results.json").write_text(json.dumps(METRICS))
    info = ModelCardInfo.from_run_dir(tmp_path, license="apache-2.0")
    assert (info.recipe_name, info.method, info.teacher, info.dataset) == (
        "clip_kd", "CLIP-KD (fd + icl + crd)", "clip-vit-b16", "rstpreid")
    assert info.metrics == METRICS and info.recipe_yaml == RECIPE and info.license == "apache-2.0"


# ---------------------------------------------------------------------------------------------
# Hub upload


def _run_folder_with_junk(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for junk in ("model.safetensors", "pytorch_model.bin", "teacher.pth", "optimizer.pt", "trainer_state.json",
                 "checkpoint-10/model.safetensors", "checkpoint-10/optimizer.pt", "teacher/best.pth"):
        (dst / junk).parent.mkdir(parents=True, exist_ok=True)
        (dst / junk).write_bytes(b"junk")
    return dst


def test_upload_plan_is_exactly_the_export_files(exported, exported_with_card, tmp_path):
    _, plain, _ = exported
    assert hub_upload_plan(plain) == [(str(plain / n), n) for n in BASE_FILES]
    _, with_card, _ = exported_with_card
    folder = _run_folder_with_junk(with_card, tmp_path / "run")
    names = [*BASE_FILES, "recipe.yaml", "test_results.json"]
    assert hub_upload_plan(folder) == [(str(folder / n), n) for n in names]
    # local-dir: still picks the export's weights among the run's other weight files
    loaded, _ = _load(folder)
    ref = load_file(str(folder / "open_clip_model.safetensors"))
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    (folder / "README.md").unlink()
    with pytest.raises(FileNotFoundError, match="README.md"):
        hub_upload_plan(folder)


class FakeHfApi:
    """Records what would be sent to the Hub; answers like HfApi (repo id completed with an owner)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, repo_id: str, **kw: Any) -> SimpleNamespace:
        self.calls.append(("create_repo", (repo_id,), kw))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"acme/{repo_id}")

    def create_branch(self, repo_id: str, **kw: Any) -> None:
        self.calls.append(("create_branch", (repo_id,), kw))

    def create_commit(self, repo_id: str, operations, **kw: Any) -> SimpleNamespace:
        ops = [(op.path_or_fileobj, op.path_in_repo) for op in operations]
        self.calls.append(("create_commit", (repo_id, ops), kw))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")


def test_push_uploads_the_plan_in_one_commit(exported_with_card, tmp_path):
    _, src, _ = exported_with_card
    folder = _run_folder_with_junk(src, tmp_path / "run")
    api = FakeHfApi()
    url = push_export_to_hub(folder, "micro-student", token="tok", private=True, commit_message="Add student",
                             api=api)
    assert url == "https://huggingface.co/acme/micro-student/commit/abc"
    names = [*BASE_FILES, "recipe.yaml", "test_results.json"]
    assert api.calls == [
        ("create_repo", ("micro-student",), {"token": "tok", "private": True, "repo_type": "model", "exist_ok": True}),
        ("create_commit", ("acme/micro-student", [(str(folder / n), n) for n in names]),
         {"commit_message": "Add student", "token": "tok", "repo_type": "model", "revision": None}),
    ]


def test_push_to_a_branch_creates_it_first(exported):
    _, folder, _ = exported
    api = FakeHfApi()
    push_export_to_hub(folder, REPO, revision="v1", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[1] == ("create_branch", (REPO,), {"branch": "v1", "token": None, "repo_type": "model",
                                                       "exist_ok": True})
    commit = api.calls[2]
    assert commit[1] == (REPO, [(str(folder / n), n) for n in BASE_FILES])
    assert commit[2]["revision"] == "v1" and commit[2]["repo_type"] == "model"
