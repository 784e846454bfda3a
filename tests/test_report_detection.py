"""kd_trainer.report on detection runs: an AP / AP50 / AP75 table, seeds averaged like retrieval
ones, the old test_map* names read as test_AP*, one table per task in a mixed folder, and the
detector's loss log drawn like any other.

Run folders are written by hand in the layout kd_trainer.runner.detection leaves (recipe.yaml with
``task: detection``, test_results.json with ``test_AP``..., trainer_state.json, stages.json), with
the builders of tests/test_report.py; every expected cell is computed here from the numbers written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from test_report import expected_cell, metrics_json, parse_table, sample_std, write_run

from kd_trainer.report import (
    ReportError,
    SkippedRunWarning,
    UnknownMetricWarning,
    collect_runs,
    group_seeds,
    loss_figure,
    loss_series,
    read_curves,
    results_table,
    results_tables,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
DET_HEAD = "Method (AP / AP50 / AP75)"
RET_HEAD = "Method (R@1 / R@5 / R@10 / mAP)"
STAGE = [{"index": 1, "name": "train", "start_step": 0, "end_step": 40, "trainable": "all", "epochs": 4}]

# method -> (recipe keys that make the configuration, {seed: (AP, AP50, AP75)}, which names the file uses)
DET_RUNS = {
    "FPN mimic": ({"mimic": {"jobs": [{"name": "job0", "loss": {"type": "l2_loss"}}]}},
                  {0: (30.0, 60.0, 20.5), 1: (33.0, 61.0, 22.5), 2: (36.0, 65.0, 24.5)}, "new"),
    # one seed written with the old names, one with the new: the alias must put them in one cell
    "no distillation": ({}, {0: (35.25, 64.5, 38.0), 1: (33.75, 63.0, 31.0)}, "mixed"),
    "teacher": ({"student": {"arch": {"depth": 50}}}, {0: (28.4, 58.6, 19.7)}, "old"),
}


def det_results(ap: float, ap50: float, ap75: float, *, old: bool = False, **extra: float) -> dict:
    """test_results.json as run_detection writes it (old=True: the names before the AP rename)."""
    names = ("test_map", "test_map_50", "test_map_75") if old else ("test_AP", "test_AP50", "test_AP75")
    return {"epoch": 8.0, **dict(zip(names, (ap, ap50, ap75))), "test_samples": 80, **extra}


def detection_history(eval_key: str = "eval_AP") -> list[dict]:
    """A mimic detection log: the detector's four loss terms (unweighted and weighted), the mimic job's
    keys, two evaluations and the summary entry, every value distinct."""
    h: list[dict] = []
    for i, step in enumerate((10, 20, 30, 40)):
        terms = {"classifier": 1.5 - 0.25 * i, "box_reg": 0.5 + 0.125 * i, "objectness": 0.75 - 0.125 * i,
                 "rpn_box_reg": 0.0625 * (i + 1)}
        mimic = 2.0 - 0.5 * i
        entry = {"epoch": step / 10, "step": step, "learning_rate": 1e-3, "grad_norm": 3.0,
                 "mimic/job0/teacher0/l2": mimic, "mimic/job0/weighted": mimic / 4, "mimic/total": mimic / 4,
                 "mimic/job0/teacher0/l2/0": 9.0, "loss": sum(terms.values()) + mimic / 4}
        for k, v in terms.items():
            entry[f"loss_{k}"] = v
            entry[f"loss_{k}_weighted"] = 2 * v
        h.append(entry)
        if step in (20, 40):
            h.append({"epoch": step / 10, "step": step, eval_key: 10.0 + step / 2, "eval_AP50": 50.0,
                      "eval_samples": 16})
    h.append({"epoch": 4.0, "step": 40, "train_loss": 1.0, "train_runtime": 5.0, "total_flos": 0.0})
    return h


def write_detection_runs(root: Path) -> dict[str, list[tuple]]:
    """The runs of DET_RUNS under ``root`` plus an unfinished one; returns {method: [(AP, AP50, AP75) per seed]}."""
    written: dict[str, list[tuple]] = {}
    for method, (extra, per_seed, names) in DET_RUNS.items():
        slug = method.split()[0].lower()
        for j, (seed, m) in enumerate(per_seed.items()):
            old = names == "old" or (names == "mixed" and j == 1)
            write_run(root / f"{slug}_s{seed}", name=f"det_{slug}", method=method, dataset="synth_det",
                      results=det_results(*m, old=old), history=detection_history(), stages=STAGE,
                      recipe_extra={**extra, "task": "detection", "seed": seed})
            written.setdefault(method, []).append(m)
    write_run(root / "teacher_s1", name="det_teacher", method="teacher", dataset="synth_det",
              recipe_extra={**DET_RUNS["teacher"][0], "task": "detection", "seed": 1})  # still training
    return written


def write_retrieval_runs(root: Path) -> dict[str, list[tuple]]:
    """Two retrieval configurations on RSTPReid: CLIP-KD over two seeds, a single Baseline run."""
    per_seed = {1: (29.0, 51.0, 61.0, 25.5, 10.5), 2: (31.4, 53.0, 63.0, 27.0, 11.5)}
    for seed, m in per_seed.items():
        write_run(root / f"clipkd_s{seed}", name=f"clipkd_s{seed}", method="CLIP-KD", dataset="rstpreid",
                  results=metrics_json(*m), recipe_extra={"seed": seed})
    baseline = (45.0, 66.0, 75.0, 40.0, 15.0)
    write_run(root / "baseline", name="baseline", method="Baseline", dataset="rstpreid",
              results=metrics_json(*baseline), recipe_extra={"seed": 1})
    return {"CLIP-KD": list(per_seed.values()), "Baseline": [baseline]}


def table_section(text: str, heading: str) -> str:
    """The lines under ``## <heading>`` up to the next ``## `` heading."""
    lines = text.splitlines()
    start = lines.index(f"## {heading}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def rows_of(text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    return parse_table("\n".join(ln for ln in text.splitlines() if ln.startswith("|")))


# --------------------------------------------------------------------------- the detection table


def test_detection_runs_get_an_AP_table_with_seeds_averaged(tmp_path: Path) -> None:
    written = write_detection_runs(tmp_path / "runs")
    with pytest.warns(SkippedRunWarning, match=r"teacher_s1: unfinished run"):
        found = collect_runs([tmp_path / "runs"])
    assert sorted(r.folder.name for r in found) == ["fpn_s0", "fpn_s1", "fpn_s2", "no_s0", "no_s1", "teacher_s0"]
    assert {r.task for r in found} == {"detection"}
    assert sorted(g.n for g in group_seeds(found)) == [1, 2, 3]

    table = results_table(found)
    head, rows = rows_of(table)
    assert head == [DET_HEAD, "synth_det"]
    assert list(rows) == ["FPN mimic", "no distillation", "teacher"]  # folder order: fpn_*, no_*, teacher_*
    for method, per_seed in written.items():
        assert rows[method]["synth_det"].removesuffix(" ≈") == expected_cell(per_seed, n_metrics=3), method
    # worked by hand: AP 30/33/36 -> 33 ± 3; AP50 60/61/65 -> 62 ± sqrt(7); AP75 20.5/22.5/24.5 -> 22.5 ± 2;
    # marked: its AP mean is within the seed spread of "no distillation" (checked below)
    assert rows["FPN mimic"]["synth_det"] == "33.00 ± 3.00 / 62.00 ± 2.65 / 22.50 ± 2.00 (n=3) ≈"
    assert rows["teacher"]["synth_det"] == "28.40 / 58.60 / 19.70"  # one run, old names: no ±, no n, no mark
    assert "R@" not in table and "mAP" not in table  # no retrieval metric anywhere in it

    # the spread check compares AP: 33 ± 3 vs 34.5 ± 1.06 differ by 1.5 < 4.06, both flagged
    ap = {m: [v[0] for v in s] for m, s in written.items()}
    diff = abs(sum(ap["FPN mimic"]) / 3 - sum(ap["no distillation"]) / 2)
    spread = sample_std(ap["FPN mimic"]) + sample_std(ap["no distillation"])
    assert diff < spread
    assert rows["no distillation"]["synth_det"].endswith(" ≈")
    notes = [ln for ln in table.splitlines() if ln.startswith("- ")]
    assert len(notes) == 1 and f"AP means differ by {diff:.2f}, less than their seed spread {spread:.2f}" in notes[0]


def test_old_metric_names_are_read_as_AP(tmp_path: Path) -> None:
    run = write_run(tmp_path / "old", name="old", dataset="synth_det", recipe_extra={"task": "detection"},
                    results=det_results(23.75, 56.5, 11.875, old=True))
    (found,) = collect_runs([run])
    assert dict(found.metrics) == {"AP": 23.75, "AP50": 56.5, "AP75": 11.875, "epoch": 8.0, "samples": 80.0}
    assert found.task == "detection"

    both = write_run(tmp_path / "both", name="both", dataset="synth_det",
                     results={**det_results(1.0, 2.0, 3.0), "test_map_50": 2.0})
    with pytest.raises(ReportError, match=r"both/test_results\.json records both test_AP50 and test_map_50"):
        collect_runs([both])


def test_a_run_without_table_metrics_or_against_its_recipe_is_an_error(tmp_path: Path) -> None:
    none = write_run(tmp_path / "none", name="none", dataset="synth_det", results={"epoch": 8.0, "test_foo": 1.0})
    with pytest.raises(ReportError, match=r"none/test_results\.json records none of the metrics.*it has epoch, foo"):
        collect_runs([none])
    both = write_run(tmp_path / "mix", name="mix", dataset="synth_det",
                     results={**det_results(1.0, 2.0, 3.0), "test_r1": 5.0})
    with pytest.raises(ReportError, match=r"metrics of several tasks \(retrieval: r1; detection: AP, AP50, AP75\)"):
        collect_runs([both])
    wrong = write_run(tmp_path / "wrong", name="wrong", dataset="synth_det", recipe_extra={"task": "retrieval"},
                      results=det_results(1.0, 2.0, 3.0))
    with pytest.raises(ReportError, match=r"records detection metrics .* but the run's recipe says task: retrieval"):
        collect_runs([wrong])


def test_two_configurations_under_one_name_are_told_apart_by_folder(tmp_path: Path) -> None:
    """As in runs/det_ev: a teacher trained 8 epochs (two seeds) and one trained 24, both `det_teacher`."""
    root = tmp_path / "runs"
    for folder, epochs, seed, m in [("t8_s0", 8, 0, (28.0, 58.0, 19.0)), ("t8_s1", 8, 1, (24.0, 56.0, 12.0)),
                                    ("t24_s0", 24, 0, (51.5, 76.5, 58.25))]:
        write_run(root / folder, name="det_teacher", dataset="synth_det", results=det_results(*m),
                  recipe_extra={"task": "detection", "seed": seed, "training": {"num_train_epochs": epochs}})
    found = collect_runs([root])
    with pytest.raises(ReportError, match=r"differ in training\.num_train_epochs"):
        results_table(found)
    _, rows = rows_of(results_table(found, duplicates="split"))
    assert rows == {f"det_teacher [{root / 't24_s0'}]": {"synth_det": "51.50 / 76.50 / 58.25"},
                    f"det_teacher [{root / 't8_s0'}+{root / 't8_s1'}]": {
                        "synth_det": expected_cell([(28.0, 58.0, 19.0), (24.0, 56.0, 12.0)], n_metrics=3)}}


# --------------------------------------------------------------------------- retrieval and detection together


def test_a_mixed_folder_gives_one_table_per_task(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    det = write_detection_runs(root / "det")
    ret = write_retrieval_runs(root / "ret")
    with pytest.warns(SkippedRunWarning):
        found = collect_runs([root])
    with pytest.raises(ReportError, match=r"several tasks \(3 retrieval, 6 detection\)"):
        results_table(found)

    tables = results_tables(found)
    assert list(tables) == ["retrieval", "detection"]
    head, rows = rows_of(tables["retrieval"])
    assert head == [RET_HEAD, "RSTPReid"] and list(rows) == ["Baseline", "CLIP-KD"]  # folder order
    assert rows["CLIP-KD"]["RSTPReid"] == expected_cell(ret["CLIP-KD"])
    assert rows["Baseline"]["RSTPReid"] == "45.00 / 66.00 / 75.00 / 40.00"
    head, rows = rows_of(tables["detection"])
    assert head == [DET_HEAD, "synth_det"] and list(rows) == ["FPN mimic", "no distillation", "teacher"]
    assert rows["no distillation"]["synth_det"].removesuffix(" ≈") == expected_cell(det["no distillation"], 3)
    # each task's table is what its runs alone give (a retrieval folder keeps its table as it was)
    assert results_table(found, task="retrieval") == tables["retrieval"]
    assert results_table([r for r in found if r.task == "retrieval"]) == tables["retrieval"]

    # a row label or dataset asked for belongs to the table of its runs, not to both
    tables = results_tables(found, order=["Baseline", "teacher", "Ours"], datasets=["synth_det", "rstpreid"])
    assert list(rows_of(tables["retrieval"])[1]) == ["Baseline", "Ours", "CLIP-KD"]
    assert list(rows_of(tables["detection"])[1]) == ["teacher", "Ours", "FPN mimic", "no distillation"]
    assert rows_of(tables["retrieval"])[0][1:] == ["RSTPReid"]
    assert rows_of(tables["detection"])[0][1:] == ["synth_det"]


def test_write_report_on_a_mixed_folder(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    det = write_detection_runs(root / "det")
    write_retrieval_runs(root / "ret")
    with pytest.warns(SkippedRunWarning) as rec:
        written = write_report([root], tmp_path / "rep", plots=True)
    said = [str(w.message) for w in rec]
    assert any("teacher_s1: unfinished run" in m for m in said)
    assert sorted(m.split("/")[-1] for m in said if m.startswith("no loss plot")) == \
        ["baseline: it has no trainer_state.json", "clipkd_s1: it has no trainer_state.json",
         "clipkd_s2: it has no trainer_state.json"]
    md = written["results"].read_text(encoding="utf-8")
    assert md.index("## Retrieval") < md.index("## Detection") < md.index("## Runs")
    ret_head, _ = rows_of(table_section(md, "Retrieval"))
    det_head, det_rows = rows_of(table_section(md, "Detection"))
    assert ret_head[0] == RET_HEAD and det_head[0] == DET_HEAD
    assert det_rows["teacher"]["synth_det"] == expected_cell(det["teacher"], 3)
    assert "Cells: AP / AP50 / AP75; – = no run." in table_section(md, "Detection")
    assert written["tables"]["detection"] in written["table"] and written["tables"]["retrieval"] in written["table"]
    assert f"`{root / 'det' / 'teacher_s1'}`: unfinished run" in md
    m = DET_RUNS["teacher"][1][0]  # written with the old names, shown with the new
    assert f"- test: AP {m[0]:.2f}, AP50 {m[1]:.2f}, AP75 {m[2]:.2f}\n" in md
    assert "also recorded" not in md  # epoch and test_samples are bookkeeping, not unknown metrics
    # one plot per detection run (the retrieval runs here have no log), each linked from its section
    assert set(written["plots"]) == {str(root / "det" / f) for f in ("fpn_s0", "fpn_s1", "fpn_s2", "no_s0", "no_s1",
                                                                      "teacher_s0")}
    for p in written["plots"].values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({p.name})" in md


def test_an_unknown_metric_is_named_not_dropped(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", name="r", dataset="synth_det", recipe_extra={"task": "detection"},
                    results=det_results(40.0, 70.0, 45.0, test_APs=12.5, test_AR100=61.25))
    with pytest.warns(UnknownMetricWarning, match=r"r/test_results\.json records test_AR100, not a detection metric"):
        written = write_report([run], tmp_path / "rep", plots=False)
    md = written["results"].read_text(encoding="utf-8")
    assert "- test: AP 40.00, AP50 70.00, AP75 45.00, APs 12.50\n" in md  # APs is known: shown, not in the table
    assert "- also recorded, in no table (not a metric this report knows): AR100 61.25\n" in md
    _, rows = rows_of(written["table"])
    assert rows["r"]["synth_det"] == "40.00 / 70.00 / 45.00"


def test_the_stage_a_staged_run_ended_in_is_bookkeeping_not_an_unknown_metric(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", name="r", dataset="synth_det", recipe_extra={"task": "detection"},
                    results=det_results(40.0, 70.0, 45.0, test_stage=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownMetricWarning)
        written = write_report([run], tmp_path / "rep", plots=False)
    assert "also recorded" not in written["results"].read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the detector's training log


@pytest.mark.parametrize("eval_key", ["eval_AP", "eval_map"])
def test_detector_loss_terms_and_eval_AP_are_curves(tmp_path: Path, eval_key: str) -> None:
    history = detection_history(eval_key)
    run = write_run(tmp_path / "d", name="d", dataset="synth_det", history=history, stages=STAGE)
    train = [h for h in history if "loss" in h]
    steps = [h["step"] for h in train]
    terms = ("classifier", "box_reg", "objectness", "rpn_box_reg")
    assert loss_series(run) == {**{t: (steps, [h[f"loss_{t}"] for h in train]) for t in terms},
                                "mimic/job0/teacher0/l2": (steps, [h["mimic/job0/teacher0/l2"] for h in train])}
    assert loss_series(run, weighted=True) == {**{t: (steps, [h[f"loss_{t}_weighted"] for h in train]) for t in terms},
                                               "mimic/job0": (steps, [h["mimic/job0/weighted"] for h in train])}
    curves = read_curves(run)
    assert curves.evals == {"AP": ([20, 40], [20.0, 30.0])}  # eval_map is the old name of eval_AP
    assert curves.total == (steps, [h["loss"] for h in train])

    fig = loss_figure(run)
    assert sorted(ln.get_label() for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")) == \
        sorted([*terms, "mimic/job0/teacher0/l2", "loss (total)"])
    (eval_line,) = fig.axes[1].get_lines()
    assert eval_line.get_label() == "eval AP" and list(eval_line.get_ydata()) == [20.0, 30.0]
    assert fig.axes[1].get_ylabel() == "eval AP (%)"


# --------------------------------------------------------------------------- the command line


def test_cli_report_on_a_mixed_folder(tmp_path: Path) -> None:
    """`python -m kd_trainer report DIR --out OUT`, as a user runs it."""
    root = tmp_path / "runs"
    det = write_detection_runs(root / "det")
    ret = write_retrieval_runs(root / "ret")
    out = tmp_path / "rep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kd_trainer", "report", str(root), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: skipped {root / 'det' / 'teacher_s1'}: unfinished run" in proc.stderr
    head, rows = rows_of(table_section(proc.stdout, "Retrieval"))
    assert head == [RET_HEAD, "RSTPReid"]
    assert rows["CLIP-KD"]["RSTPReid"] == expected_cell(ret["CLIP-KD"])
    head, rows = rows_of(table_section(proc.stdout, "Detection"))
    assert head == [DET_HEAD, "synth_det"]
    for method, per_seed in det.items():
        assert rows[method]["synth_det"].removesuffix(" ≈") == expected_cell(per_seed, n_metrics=3), method
    assert rows["FPN mimic"]["synth_det"] == "33.00 ± 3.00 / 62.00 ± 2.65 / 22.50 ± 2.00 (n=3) ≈"
    assert f"wrote {out / 'results.md'}" in proc.stdout
    assert len(list(out.glob("*_losses.png"))) == 6

    # a folder of only the unfinished detection run: exit 2 with a message, no traceback
    only = tmp_path / "only"
    write_run(only / "t", name="t", dataset="synth_det", recipe_extra={"task": "detection"})
    proc = subprocess.run([sys.executable, "-m", "kd_trainer", "report", str(only), "--out", str(out), "--no-plots"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "error: no finished run" in proc.stderr and "Traceback" not in proc.stderr
