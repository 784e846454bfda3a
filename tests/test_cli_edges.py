"""The CLI at its edges: a reader that leaves early, a demo asked for a seed count it cannot give, and
eval given a dataset name it does not know or a run or dataset of another task."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import Ran, run_cli

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kd_trainer", *args], cwd=REPO, stderr=subprocess.PIPE, **kw)


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `kd-trainer plan ... | head -1`: the pipe closes before the plan is written.
    proc = _cli("plan", "recipes/ours_3stage.yaml", "--json", stdout=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_the_demo_refuses_a_seed_count_it_cannot_give_as_a_usage_error():
    proc = _cli("demo", "--seeds", "0", stdout=subprocess.DEVNULL)
    err = proc.stderr.read().decode()
    assert proc.wait() == 2, err
    assert "Traceback" not in err and "--seeds: invalid choice: 0" in err, err


def _one_error_line(ran: Ran) -> str:
    """The refusal: exit 2, and exactly one line on stderr (log records aside), ``error: ...``."""
    lines = [ln for ln in ran.stderr.splitlines() if ln.strip() and not re.match(r"\d{4}-\d\d-\d\d ", ln)]
    assert ran.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr
    return lines[0]


@pytest.mark.parametrize("onnx", [False, True])
def test_eval_refuses_an_unknown_dataset_name_in_one_line(micro_folder, tmp_path, onnx):
    model = str(tmp_path / "no_export") if onnx else str(micro_folder)  # checked before any model is read
    ran = run_cli("eval", model, *(["--onnx"] if onnx else []), "--dataset", "cuhk", "--root", str(tmp_path))
    line = _one_error_line(ran)
    assert "Unknown dataset 'cuhk'; valid names: cuhk_pedes" in line, line
    assert not list(micro_folder.glob("eval_*.json"))


@pytest.mark.parametrize("dataset, task", [("synth_shapes", "classification"), ("SynthDet", "detection")])
def test_eval_refuses_a_classification_or_detection_dataset(micro_folder, tmp_path, dataset, task):
    line = _one_error_line(run_cli("eval", str(micro_folder), "--dataset", dataset, "--root", str(tmp_path)))
    assert f"--dataset {dataset!r} is a {task} data set" in line, line
    assert "needs a retrieval data set, one of cuhk_pedes, icfg_pedes, rstpreid, synth_pedes" in line, line


@pytest.mark.parametrize("task", ["classification", "detection"])
@pytest.mark.parametrize("finished", [True, False])
def test_eval_refuses_a_classification_or_detection_run_and_says_where_its_metrics_are(tmp_path, task, finished):
    run = tmp_path / "runs" / "cls_kd"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(f"name: cls_kd\ntask: {task}\n")
    if finished:
        (run / "test_results.json").write_text('{"test_top1": 90.0}')
    line = _one_error_line(run_cli("eval", str(run), "--dataset", "synth_shapes", "--root", str(tmp_path)))
    assert f"is a {task} run" in line and f"says task: {task}" in line, line
    assert "eval ranks text-to-image retrieval models only" in line, line
    assert f"its test metrics are in {run / 'test_results.json'}, written at the end of its run" in line, line
    assert ("not there yet" in line) is not finished, line
    # a checkpoint in the run folder, or in a checkpoint-N folder of it, is the same run's
    (run / "checkpoint-5").mkdir()
    for model in (run / "model.safetensors", run / "checkpoint-5"):
        assert f"is a {task} run" in _one_error_line(run_cli("eval", str(model), "--dataset", "synth_pedes",
                                                             "--root", str(tmp_path)))
