"""kd_trainer.report: the results table, loss-curve data and plots, write_report and `kd-trainer report`.

Every run folder here is written to disk by hand in the exact layout kd_trainer.runner leaves
(recipe.yaml, test_results.json, trainer_state.json, stages.json), with numbers chosen so a
wrong cell, a swapped column or a misplaced boundary fails a test.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from kd_trainer.cli import main as cli_main
from kd_trainer.recipe import dump_recipe, load_recipe
from kd_trainer.report import (
    PlotDependencyError,
    ReportError,
    SkippedRunWarning,
    collect_runs,
    group_seeds,
    loss_figure,
    loss_series,
    plot_loss_curves,
    read_curves,
    read_stages,
    results_table,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- fixtures on disk


def write_run(folder: Path, *, name: str, dataset: str, method: str | None = None,
              results: dict | None = None, history: list[dict] | None = None,
              stages: list[dict] | None = None, steps_per_epoch: int = 10,
              recipe_extra: dict | None = None, stages_extra: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    extra = dict(recipe_extra or {})
    recipe = {"name": name, **({"method": method} if method else {}),
              "data": {"name": dataset, "root": "./data"},
              "training": {"output_dir": str(folder), **extra.pop("training", {})}, **extra}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if results is not None:
        (folder / "test_results.json").write_text(json.dumps(results, indent=2))
    if history is not None:
        state = {"global_step": max((h["step"] for h in history), default=0), "log_history": history,
                 "best_metric": None, "epoch": history[-1]["epoch"] if history else 0}
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if stages is not None:
        (folder / "stages.json").write_text(json.dumps({"steps_per_epoch": steps_per_epoch, "stages": stages,
                                                        **(stages_extra or {})}))
    return folder


def metrics_json(r1: float, r5: float, r10: float, mAP: float, mINP: float, **extra: float) -> dict:
    return {"test_r1": r1, "test_r5": r5, "test_r10": r10, "test_mAP": mAP, "test_mINP": mINP,
            "test_runtime": 1.5, "test_samples_per_second": 100.0, "epoch": 3.0, **extra}


def single_stage_history() -> list[dict]:
    """A plain run: loss_<term> / loss_<term>_weighted every 5 steps, two evaluations, the summary entry."""
    h: list[dict] = []
    for i, step in enumerate([5, 10, 15, 20]):
        itc, fd = 4.0 - 0.5 * i, 1.0 - 0.1 * i
        h.append({"epoch": step / 10, "step": step, "loss": round(itc + 0.5 * fd, 6), "learning_rate": 1e-4,
                  "grad_norm": 2.0, "loss_itc": itc, "loss_itc_weighted": itc,
                  "loss_fd": fd, "loss_fd_weighted": 0.5 * fd})
        if step in (10, 20):
            h.append({"epoch": step / 10, "step": step, "eval_r1": 10.0 + step, "eval_r5": 30.0,
                      "eval_r10": 40.0, "eval_mAP": 9.0, "eval_mINP": 2.0, "eval_runtime": 0.3})
    h.append({"epoch": 2.0, "step": 20, "train_loss": 3.1, "train_runtime": 9.9, "total_flos": 0.0})
    return h


THREE_STAGES = [
    {"index": 1, "name": "image", "start_step": 0, "end_step": 40, "trainable": "image", "epochs": 4},
    {"index": 2, "name": "text", "start_step": 40, "end_step": 80, "trainable": "text", "epochs": 4},
    {"index": 3, "name": "joint", "start_step": 80, "end_step": 120, "trainable": "all", "epochs": 4},
]
STAGE_TERMS = {  # term -> (unweighted value at log i, weight)
    "image": ["motis[image]", "st_itc"],
    "text": ["motis[text]", "ss_itc"],
    "joint": ["ss_itc", "inter_ss_kl", "st_itc"],  # ss_itc continues from `text`; st_itc comes back
}


def term_value(term: str, step: int) -> float:
    """A distinct, exactly representable value per (term, step), so any mix-up shows."""
    return round(sum(map(ord, term)) % 97 / 10 + step / 1000, 6)


def multi_stage_history() -> list[dict]:
    h: list[dict] = []
    for stage in THREE_STAGES:
        for step in range(stage["start_step"] + 10, stage["end_step"] + 1, 10):
            entry = {"epoch": step / 10, "step": step, "learning_rate": 1e-5, "grad_norm": 1.0,
                     "stage": stage["index"], f"{stage['name']}/alpha": 0.9}
            total = 0.0
            for term in STAGE_TERMS[stage["name"]]:
                v = term_value(term, step)
                entry[f"{stage['name']}/loss_{term}"] = v
                entry[f"{stage['name']}/loss_{term}_weighted"] = round(0.9 * v, 6)
                total += 0.9 * v
            entry["loss"] = round(total, 6)
            h.append(entry)
        h.append({"epoch": stage["end_step"] / 10, "step": stage["end_step"], "eval_r1": 20.0 + stage["index"],
                  "eval_r5": 40.0, "eval_r10": 50.0, "eval_mAP": 18.0, "eval_mINP": 5.0,
                  "eval_stage": stage["index"],
                  **({f"eval_hybrid_{stage['trainable']}_{m}": 30.0 + stage["index"]
                      for m in ("r1", "r5", "r10", "mAP", "mINP")} if stage["trainable"] != "all" else {})})
    h.append({"epoch": 12.0, "step": 120, "train_loss": 2.0, "train_runtime": 10.0})
    return h


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """runs/{clip_kd (single stage, RSTPReid), motis3 (3 stages, RSTPReid), motis_cuhk (CUHK-PEDES),
    unfinished (recipe and log, no test results)}."""
    root = tmp_path / "runs"
    write_run(root / "clip_kd", name="clip_kd_rstp", method="CLIP-KD", dataset="rstpreid",
              results=metrics_json(41.25, 65.5, 75.125, 33.0, 12.5), history=single_stage_history())
    write_run(root / "motis3", name="motis3_rstp", method="MoTIS (3 stages)", dataset="rstpreid",
              results=metrics_json(50.2, 73.78, 82.31, 46.306, 21.0, test_hybrid_text_r1=48.5,
                                   test_hybrid_text_mAP=44.25),
              history=multi_stage_history(), stages=THREE_STAGES)
    write_run(root / "nested" / "motis_cuhk", name="motis3_cuhk", method="MoTIS (3 stages)",
              dataset="CUHK-PEDES",  # as a user may write it: the report canonicalises
              results=metrics_json(60.0, 80.004, 87.996, 55.555, 30.0), history=single_stage_history())
    write_run(root / "unfinished", name="still_training", method="Ours", dataset="icfg_pedes",
              history=single_stage_history()[:2])
    return root


def parse_table(table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(column heads, {row label: {column head: cell}}) from a Markdown table."""
    lines = table.strip().splitlines()
    split = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    head = split[0]
    assert set(lines[1]) <= set("|-: "), lines[1]
    return head, {row[0]: dict(zip(head[1:], row[1:])) for row in split[2:]}


# --------------------------------------------------------------------------- collecting runs


def test_collect_finds_nested_runs_and_warns_about_the_unfinished_one(runs: Path) -> None:
    with pytest.warns(SkippedRunWarning, match=r"unfinished.*test_results\.json") as rec:
        found = collect_runs([runs])
    assert [r.name for r in found] == ["clip_kd_rstp", "motis3_rstp", "motis3_cuhk"]
    assert any(str(runs / "unfinished") in str(w.message) for w in rec)
    cuhk = found[2]
    assert (cuhk.label, cuhk.dataset, cuhk.dataset_name) == ("MoTIS (3 stages)", "cuhk_pedes", "CUHK-PEDES")
    assert cuhk.metrics["r1"] == 60.0 and cuhk.folder == runs / "nested" / "motis_cuhk"
    assert found[1].hybrid == {"text": {"r1": 48.5, "mAP": 44.25}}
    # a run folder named directly, twice, is one run; the label falls back to the recipe name
    write_run(runs / "plain", name="itc_only", dataset="rstpreid", results=metrics_json(1, 2, 3, 4, 5))
    again = collect_runs([runs / "plain", runs / "plain" / "test_results.json"])
    assert [(r.label, r.name) for r in again] == [("itc_only", "itc_only")]


def test_malformed_json_names_the_file(runs: Path) -> None:
    bad = runs / "motis3" / "test_results.json"
    bad.write_text('{"test_r1": 50.2,')
    with pytest.raises(ReportError, match=r"motis3/test_results\.json is not valid JSON"):
        collect_runs([runs / "motis3"])
    with pytest.raises(ReportError, match="no such file or folder"):
        collect_runs([runs / "nope"])


# --------------------------------------------------------------------------- the table


def test_results_table_cells(runs: Path) -> None:
    with pytest.warns(SkippedRunWarning):
        found = collect_runs([runs])
    head, rows = parse_table(results_table(found))
    assert head == ["Method (R@1 / R@5 / R@10 / mAP)", "CUHK-PEDES", "RSTPReid"]  # DATASETS order
    assert list(rows) == ["CLIP-KD", "MoTIS (3 stages)"]  # order first seen
    assert rows["MoTIS (3 stages)"]["RSTPReid"] == "50.20 / 73.78 / 82.31 / 46.31"
    assert rows["MoTIS (3 stages)"]["CUHK-PEDES"] == "60.00 / 80.00 / 88.00 / 55.55"  # 55.555 -> 55.55 (binary)
    assert rows["CLIP-KD"]["RSTPReid"] == "41.25 / 65.50 / 75.12 / 33.00"
    assert rows["CLIP-KD"]["CUHK-PEDES"] == "–"

    head, rows = parse_table(results_table(found, with_minp=True, order=["MoTIS (3 stages)", "Ours"],
                                           datasets=["rstpreid"]))
    assert head == ["Method (R@1 / R@5 / R@10 / mAP / mINP)", "RSTPReid", "CUHK-PEDES"]
    assert list(rows) == ["MoTIS (3 stages)", "Ours", "CLIP-KD"]  # given order, a run-less row, the rest
    assert rows["MoTIS (3 stages)"]["RSTPReid"] == "50.20 / 73.78 / 82.31 / 46.31 / 21.00"
    assert rows["Ours"] == {"RSTPReid": "–", "CUHK-PEDES": "–"}


def test_duplicate_label_and_dataset_is_an_error_or_split_rows(runs: Path) -> None:
    write_run(runs / "motis3_seed2", name="motis3_rstp_seed2", method="MoTIS (3 stages)", dataset="rstpreid",
              results=metrics_json(49.0, 72.0, 81.0, 45.0, 20.0))
    with pytest.warns(SkippedRunWarning):
        found = collect_runs([runs])
    with pytest.raises(ReportError) as e:
        results_table(found)
    msg = str(e.value)
    assert "MoTIS (3 stages)" in msg and "RSTPReid" in msg
    assert str(runs / "motis3") in msg and str(runs / "motis3_seed2") in msg

    _, rows = parse_table(results_table(found, duplicates="split"))
    assert list(rows) == ["CLIP-KD", "MoTIS (3 stages) [motis3_rstp]", "MoTIS (3 stages) [motis3_rstp_seed2]",
                          "MoTIS (3 stages)"]  # first seen: runs/motis3_seed2 sorts before runs/nested
    assert rows["MoTIS (3 stages) [motis3_rstp]"]["RSTPReid"] == "50.20 / 73.78 / 82.31 / 46.31"
    assert rows["MoTIS (3 stages) [motis3_rstp_seed2]"]["RSTPReid"] == "49.00 / 72.00 / 81.00 / 45.00"
    assert rows["MoTIS (3 stages)"] == {"CUHK-PEDES": "60.00 / 80.00 / 88.00 / 55.55", "RSTPReid": "–"}


# --------------------------------------------------------------------------- loss curves


def test_loss_series_multi_stage_matches_the_log(runs: Path) -> None:
    run = runs / "motis3"
    series = loss_series(run)
    assert list(series) == ["motis[image]", "st_itc", "motis[text]", "ss_itc", "inter_ss_kl"]
    expected_steps = {"motis[image]": [10, 20, 30, 40], "st_itc": [10, 20, 30, 40, 90, 100, 110, 120],
                      "motis[text]": [50, 60, 70, 80], "ss_itc": [50, 60, 70, 80, 90, 100, 110, 120],
                      "inter_ss_kl": [90, 100, 110, 120]}
    for term, (steps, values) in series.items():
        assert steps == expected_steps[term], term
        assert values == [term_value(term, s) for s in steps], term
    weighted = loss_series(run, weighted=True)
    assert weighted["ss_itc"][1] == [round(0.9 * term_value("ss_itc", s), 6) for s in expected_steps["ss_itc"]]

    curves = read_curves(run)
    assert curves.boundaries == [40, 80]  # start_step of stages 2 and 3
    assert [s.name for s in curves.stages] == ["image", "text", "joint"]
    assert curves.total[0] == list(range(10, 121, 10))
    assert curves.evals["r1"] == ([40, 80, 120], [21.0, 22.0, 23.0])
    assert curves.evals["hybrid_image_r1"] == ([40], [31.0])
    assert curves.evals["hybrid_text_r1"] == ([80], [32.0])


def test_stages_inferred_without_stages_json(runs: Path) -> None:
    (runs / "motis3" / "stages.json").unlink()
    stages = read_stages(runs / "motis3")
    assert [(s.index, s.name, s.start_step, s.end_step) for s in stages] == \
        [(1, "image", 0, 40), (2, "text", 40, 80), (3, "joint", 80, 120)]
    assert read_stages(runs / "clip_kd") == []  # a plain run has no stages


def test_a_window_across_a_boundary_keeps_both_points_in_stage_order(tmp_path: Path) -> None:
    stages = THREE_STAGES[1:]
    history = [{"step": 45, "epoch": 4.5, "loss": 1.0, "stage": 2, "text/loss_ss_itc": 2.0},
               {"step": 85, "epoch": 8.5, "loss": 1.0, "stage": 3,  # joint's key first on purpose
                "joint/loss_ss_itc": 4.0, "text/loss_ss_itc": 3.0}]
    run = write_run(tmp_path / "r", name="r", dataset="rstpreid", history=history, stages=stages)
    assert loss_series(run) == {"ss_itc": ([45, 85, 85], [2.0, 3.0, 4.0])}


def test_figure_lines_are_the_series_and_boundaries_are_stage_starts(runs: Path) -> None:
    run = runs / "motis3"
    fig = loss_figure(run)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines() if ln.get_gid() != "stage-boundary"}
    series = loss_series(run)
    assert set(lines) == {*series, "loss (total)"}
    for term, (steps, values) in series.items():
        xs, ys = lines[term].get_xdata(), lines[term].get_ydata()
        kept = [(x, y) for x, y in zip(xs, ys) if not math.isnan(x)]
        assert kept == list(zip(map(float, steps), values)), term
    # st_itc is absent from the text stage: its line is broken there, not drawn across it
    st = list(lines["st_itc"].get_xdata())
    assert math.isnan(st[4]) and st[3] == 40 and st[5] == 90
    assert lines["loss (total)"].get_linewidth() > lines["ss_itc"].get_linewidth()
    vlines = [ln for ln in ax.get_lines() if ln.get_gid() == "stage-boundary"]
    assert sorted(ln.get_xdata()[0] for ln in vlines) == [40, 80]
    labels = [t.get_text().strip() for t in ax.texts if t.get_gid() == "stage-label"]
    assert labels == ["1: image, image", "2: text, text", "3: joint, all"]
    eval_lines = {ln.get_label(): ln for ln in fig.axes[1].get_lines()}
    assert list(eval_lines["eval R@1"].get_ydata()) == [21.0, 22.0, 23.0]


def test_plot_single_stage_png(runs: Path, tmp_path: Path) -> None:
    out = plot_loss_curves(runs / "clip_kd", tmp_path / "png" / "clip.png", weighted=True)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    fig = loss_figure(runs / "clip_kd", total=False)
    ax = fig.axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == ["itc", "fd"]  # no total, no boundaries
    assert list(ax.get_lines()[1].get_ydata()) == [1.0, 0.9, 0.8, 0.7]
    assert not ax.texts


# --------------------------------------------------------------------------- report and CLI


def test_write_report(runs: Path, tmp_path: Path) -> None:
    with pytest.warns(SkippedRunWarning, match="unfinished"):
        written = write_report([runs], tmp_path / "reports", with_minp=True)
    md = written["results"].read_text(encoding="utf-8")
    assert "| MoTIS (3 stages)" in md and "50.20 / 73.78 / 82.31 / 46.31 / 21.00" in md
    assert str(runs / "unfinished") in md  # the skipped run is listed, not silently dropped
    assert "hybrid text (teacher image + student text): R@1 48.50, mAP 44.25" in md
    assert "last evaluation with hybrid image (student image + teacher text), step 40: R@1 31.00" in md
    assert sorted(p.name for p in written["plots"].values()) == \
        ["clip_kd_rstp_losses.png", "motis3_cuhk_losses.png", "motis3_rstp_losses.png"]
    for p in written["plots"].values():
        assert p.parent == tmp_path / "reports" and p.read_bytes()[:8] == PNG_MAGIC
        assert f"]({p.name})" in md


def test_cli_report(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    cli_main(["report", str(runs), "--out", str(out), "--no-plots"])
    captured = capsys.readouterr()
    _, rows = parse_table("\n".join(ln for ln in captured.out.splitlines() if ln.startswith("|")))
    assert rows["CLIP-KD"]["CUHK-PEDES"] == "–"
    assert rows["MoTIS (3 stages)"]["RSTPReid"] == "50.20 / 73.78 / 82.31 / 46.31"
    assert f"wrote {out / 'results.md'}" in captured.out
    assert "warning: skipped" in captured.err and str(runs / "unfinished") in captured.err
    assert not list(out.glob("*.png"))

    with pytest.raises(SystemExit) as e:  # only an unfinished run: exit 2 with a message, no traceback
        cli_main(["report", str(runs / "unfinished"), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: no finished run" in err and "Traceback" not in err

    write_run(runs / "dup", name="again", method="CLIP-KD", dataset="rstpreid", results=metrics_json(1, 2, 3, 4, 5))
    with pytest.raises(SystemExit) as e:
        cli_main(["report", str(runs), "--out", str(out), "--no-plots"])
    assert e.value.code == 2 and str(runs / "dup") in capsys.readouterr().err


def test_missing_matplotlib_says_what_to_install(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `import matplotlib.figure` now fails
    with pytest.raises(PlotDependencyError, match=r"pip install 'kd_trainer\[plot\]'"):
        plot_loss_curves(runs / "clip_kd", tmp_path / "x.png")
    with pytest.raises(SystemExit) as e:
        cli_main(["report", str(runs / "clip_kd"), "--out", str(tmp_path / "rep")])
    assert e.value.code == 2 and "kd_trainer[plot]" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()  # checked before anything is written


# --------------------------------------------------------------------------- seeds of one configuration


def sample_std(xs: list[float]) -> float:
    """Sample standard deviation (n - 1), written out: the reference the cells are checked against."""
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# method -> dataset -> per seed (r1, r5, r10, mAP, mINP); A and B are within spread on RSTPReid, far on CUHK
SEEDED = {
    "MoTIS (2 stages)": ({"loss": {"terms": [{"name": "motis", "weight": 1.0}]}}, {
        "rstpreid": {1: (28.1, 50.0, 60.0, 25.0, 10.0), 2: (30.6, 52.5, 61.0, 26.2, 11.0),
                     3: (26.3, 49.0, 62.5, 24.1, 12.0)},
        "cuhk_pedes": {1: (40.0, 61.0, 70.0, 33.0, 9.0), 2: (41.0, 62.0, 71.0, 34.0, 9.5)},
    }),
    "CLIP-KD": ({"loss": {"terms": [{"name": "fd", "weight": 2000.0}]}}, {
        "rstpreid": {1: (29.0, 51.0, 61.0, 25.5, 10.5), 2: (31.4, 53.0, 63.0, 27.0, 11.5)},
        "cuhk_pedes": {1: (55.0, 75.0, 82.0, 45.0, 20.0), 2: (56.0, 76.0, 83.0, 46.0, 21.0)},
    }),
}


def write_seeded(root: Path, *, skip: tuple = ()) -> dict[tuple[str, str], list[tuple]]:
    """Seed runs of two configurations on two datasets (names and output folders differ per seed, as
    real runs do), plus one single-seed Baseline run; returns {(method, dataset): [metrics per seed]}."""
    written: dict[tuple[str, str], list[tuple]] = {}
    for method, (extra, per_ds) in SEEDED.items():
        slug = method.split()[0].lower().replace("-", "")
        for ds, per_seed in per_ds.items():
            for seed, m in per_seed.items():
                if (slug, ds, seed) in skip:
                    continue
                write_run(root / f"{slug}_{ds}_s{seed}", name=f"{slug}_{ds}_s{seed}", method=method, dataset=ds,
                          results=metrics_json(*m), recipe_extra={**extra, "seed": seed, "training": {"seed": seed}})
                written.setdefault((method, ds), []).append(m)
    write_run(root / "baseline", name="baseline", method="Baseline", dataset="rstpreid",
              results=metrics_json(45.0, 66.0, 75.0, 40.0, 15.0), recipe_extra={"seed": 1})
    written[("Baseline", "rstpreid")] = [(45.0, 66.0, 75.0, 40.0, 15.0)]
    return written


def expected_cell(per_seed: list[tuple], n_metrics: int = 4) -> str:
    if len(per_seed) == 1:
        return " / ".join(f"{v:.2f}" for v in per_seed[0][:n_metrics])
    cols = list(zip(*per_seed))[:n_metrics]
    return " / ".join(f"{sum(c) / len(c):.2f} ± {sample_std(list(c)):.2f}" for c in cols) + f" (n={len(per_seed)})"


def table_rows(table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    return parse_table("\n".join(ln for ln in table.splitlines() if ln.startswith("|")))


def test_seeds_of_one_configuration_share_a_cell(tmp_path: Path) -> None:
    written = write_seeded(tmp_path / "runs")
    found = collect_runs([tmp_path / "runs"])
    # in folder order: baseline, clipkd_cuhk_pedes_s*, clipkd_rstpreid_s*, motis_cuhk_pedes_s*, motis_rstpreid_s*
    assert [g.n for g in group_seeds(found)] == [1, 2, 2, 2, 3]
    table = results_table(found, order=["MoTIS (2 stages)", "CLIP-KD", "Baseline"])
    head, rows = table_rows(table)
    assert head == ["Method (R@1 / R@5 / R@10 / mAP)", "CUHK-PEDES", "RSTPReid"]
    assert list(rows) == ["MoTIS (2 stages)", "CLIP-KD", "Baseline"]
    for (method, ds), per_seed in written.items():
        cell = rows[method][{"rstpreid": "RSTPReid", "cuhk_pedes": "CUHK-PEDES"}[ds]]
        assert cell.removesuffix(" ≈") == expected_cell(per_seed), (method, ds)
    assert rows["MoTIS (2 stages)"]["RSTPReid"].startswith("28.33 ± 2.16 / ")  # worked by hand from SEEDED
    assert rows["Baseline"]["RSTPReid"] == "45.00 / 66.00 / 75.00 / 40.00"  # one run: no ±, no n
    assert "mean ± sample standard deviation" in table

    _, rows = table_rows(results_table(found, with_minp=True))
    minp = [m[4] for m in written[("CLIP-KD", "rstpreid")]]
    assert rows["CLIP-KD"]["RSTPReid"].removesuffix(" ≈").endswith(
        f" / {sum(minp) / 2:.2f} ± {sample_std(minp):.2f} (n=2)")


def test_methods_closer_than_their_seed_spread_are_marked(tmp_path: Path) -> None:
    written = write_seeded(tmp_path / "runs")
    table = results_table(collect_runs([tmp_path / "runs"]))
    _, rows = table_rows(table)
    r1 = {k: [m[0] for m in v] for k, v in written.items()}
    a, b = r1[("MoTIS (2 stages)", "rstpreid")], r1[("CLIP-KD", "rstpreid")]
    diff = abs(sum(a) / len(a) - sum(b) / len(b))
    spread = sample_std(a) + sample_std(b)
    assert diff < spread  # the data is built so; the table must say so
    assert rows["MoTIS (2 stages)"]["RSTPReid"].endswith(" ≈") and rows["CLIP-KD"]["RSTPReid"].endswith(" ≈")
    for method, ds in [("Baseline", "RSTPReid"), ("MoTIS (2 stages)", "CUHK-PEDES"), ("CLIP-KD", "CUHK-PEDES")]:
        assert not rows[method][ds].endswith("≈"), (method, ds)  # far apart: 15 points on CUHK-PEDES
    notes = [ln for ln in table.splitlines() if ln.startswith("- ") and "differ by" in ln]
    assert len(notes) == 1, notes
    assert notes[0].startswith("- RSTPReid: CLIP-KD (") and "MoTIS (2 stages) (" in notes[0]
    assert f"differ by {diff:.2f}" in notes[0] and f"seed spread {spread:.2f}" in notes[0]

    # with the second MoTIS seed left out, the gap (3.00) exceeds the spread (2.97): no mark
    other = tmp_path / "fewer"
    written = write_seeded(other, skip=(("motis", "rstpreid", 2),))
    a = [m[0] for m in written[("MoTIS (2 stages)", "rstpreid")]]
    assert abs(sum(a) / 2 - sum(b) / 2) >= sample_std(a) + sample_std(b)
    table = results_table(collect_runs([other]))
    assert "≈" not in table


def test_pairs_further_apart_than_their_seed_spread_are_listed_on_r1_and_map(tmp_path: Path) -> None:
    written = write_seeded(tmp_path / "runs")
    table = results_table(collect_runs([tmp_path / "runs"]))
    listed = [ln for ln in table.splitlines() if ln.startswith("- ") and "above" in ln]
    expected = []
    for index, name in ((0, "R@1"), (3, "mAP")):
        for ds, shown in (("rstpreid", "RSTPReid"), ("cuhk_pedes", "CUHK-PEDES")):
            a = [m[index] for m in written[("MoTIS (2 stages)", ds)]]
            b = [m[index] for m in written[("CLIP-KD", ds)]]
            diff, spread = sum(b) / len(b) - sum(a) / len(a), sample_std(a) + sample_std(b)
            if abs(diff) > spread:  # by hand: only CUHK-PEDES, 15 points on R@1 and 12 on mAP
                assert diff > 0
                expected.append(f"- {shown}, {name}: CLIP-KD above MoTIS (2 stages) by {diff:.2f}, "
                                f"more than their seed spread {spread:.2f}")
    assert len(expected) == 2 and sorted(listed) == sorted(expected)
    # The one-seed Baseline has no spread, so it is in no pair.
    assert "Baseline" not in "\n".join(listed) and "Pairs that separate" in table

def test_individual_runs_stay_listable(tmp_path: Path) -> None:
    written = write_seeded(tmp_path / "runs")
    found = collect_runs([tmp_path / "runs"])
    _, rows = table_rows(results_table(found, seeds="split", duplicates="split"))
    for seed, m in enumerate(written[("MoTIS (2 stages)", "rstpreid")], start=1):
        assert rows[f"MoTIS (2 stages) [motis_rstpreid_s{seed}]"]["RSTPReid"] == expected_cell([m])
    assert rows["Baseline"]["RSTPReid"] == expected_cell(written[("Baseline", "rstpreid")])
    with pytest.raises(ReportError, match="MoTIS"):
        results_table(found, seeds="split")  # one cell, several runs, and no averaging asked for


def test_runs_that_are_not_seeds_of_one_configuration_are_not_averaged(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    m1, m2 = metrics_json(10, 20, 30, 40, 50), metrics_json(12, 22, 32, 42, 52)
    write_run(root / "a1", name="a1", method="M", dataset="rstpreid", results=m1, recipe_extra={"seed": 1})
    write_run(root / "a2", name="a2", method="M", dataset="rstpreid", results=m2, recipe_extra={"seed": 1})
    with pytest.raises(ReportError, match=r"same seed \(1\)") as e:
        results_table(collect_runs([root]))
    assert str(root / "a1") in str(e.value) and str(root / "a2") in str(e.value)

    (root / "a2" / "recipe.yaml").write_text(yaml.safe_dump(
        {"name": "a2", "method": "M", "seed": 2, "data": {"name": "rstpreid", "root": "./data"}, "loss": {"alpha": 0.5},
         "training": {"output_dir": str(root / "a2")}}))
    with pytest.raises(ReportError, match=r"their recipes differ in loss\.alpha\)"):
        results_table(collect_runs([root]))

    # two configurations, each over seeds, under one label: a row per configuration, each averaged
    write_run(root / "b1", name="b1", method="M", dataset="rstpreid", results=m2,
              recipe_extra={"seed": 1, "loss": {"alpha": 0.5}})
    _, rows = table_rows(results_table(collect_runs([root]), duplicates="split"))
    assert list(rows) == ["M [a1]", "M [a2+b1]"]
    assert rows["M [a1]"]["RSTPReid"] == "10.00 / 20.00 / 30.00 / 40.00"
    assert rows["M [a2+b1]"]["RSTPReid"] == "12.00 ± 0.00 / 22.00 ± 0.00 / 32.00 ± 0.00 / 42.00 ± 0.00 (n=2)"


# --------------------------------------------------------------------------- which split chose the checkpoint


def test_checkpoint_column_says_which_split_chose_it(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_seeded(root)
    stages = THREE_STAGES[:1]
    for seed, epoch in ((1, 7), (3, 4)):
        path = root / f"motis_rstpreid_s{seed}" / "test_results.json"
        results = json.loads(path.read_text())
        results["selected"] = {"metric": "r1", "split": "test", "epoch": epoch}
        path.write_text(json.dumps(results))
    s2 = root / "motis_rstpreid_s2"  # this one records it in stages.json, in its last stage
    (s2 / "stages.json").write_text(json.dumps({"stages": [{**stages[0], "selected": {
        "metric": "r1", "split": "test", "epoch": 9}}]}))
    path = root / "clipkd_rstpreid_s1" / "test_results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "test_selected": {"metric": "mAP", "split": "val", "epoch": 2}}))

    found = collect_runs([root])
    by_name = {r.name: r for r in found}
    assert (by_name["motis_rstpreid_s2"].selected.epoch, by_name["motis_rstpreid_s2"].selected.source.name) == \
        (9, "stages.json")
    table = results_table(found)
    head, rows = table_rows(table)
    assert head[-1] == "Checkpoint"
    assert rows["MoTIS (2 stages)"]["Checkpoint"] == "CUHK-PEDES: —; RSTPReid: test, best R@1"
    assert rows["CLIP-KD"]["Checkpoint"] == "CUHK-PEDES: —; RSTPReid: mixed: val, best mAP ×1, — ×1"
    assert rows["Baseline"]["Checkpoint"] == "—"
    assert "test-set selection" in table

    report = write_report([root], tmp_path / "rep", plots=False)["results"].read_text(encoding="utf-8")
    assert "checkpoint: epoch 7 with the best R@1 on the test split (recorded in test_results.json)" in report
    assert "checkpoint: epoch 9 with the best R@1 on the test split (recorded in stages.json)" in report
    assert f"- run `motis_rstpreid_s3`, folder `{root / 'motis_rstpreid_s3'}`, seed 3\n" in report


def test_a_malformed_or_contradictory_selection_names_the_file(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", name="r", dataset="rstpreid",
                    results={**metrics_json(1, 2, 3, 4, 5), "selected": {"metric": "r1", "split": "train"}})
    with pytest.raises(ReportError, match=r"r/test_results\.json: `selected\.split` must be one of"):
        collect_runs([run])
    run = write_run(tmp_path / "r", name="r", dataset="rstpreid", stages=THREE_STAGES,
                    stages_extra={"selected": {"metric": "r1", "split": "val", "epoch": 3}},
                    results={**metrics_json(1, 2, 3, 4, 5), "selected": {"metric": "r1", "split": "test",
                                                                         "epoch": 3}})
    with pytest.raises(ReportError, match="record different checkpoint choices"):
        collect_runs([run])


def test_a_run_shorter_than_an_epoch_records_a_fractional_epoch(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """training.max_steps=2 (or a stage of `steps: 2`) keeps the student of step 2 of 36: the trainer
    records epoch round(2 / 36, 3) = 0.056, in test_results.json and in stages.json. Shown as is."""
    chosen = {"metric": "r1", "split": "val", "epoch": 0.056, "step": 2, "stage": "image", "value": 1.5}
    run = write_run(tmp_path / "runs" / "motis", name="motis", method="MoTIS", dataset="rstpreid",
                    stages=THREE_STAGES[:1], steps_per_epoch=36, stages_extra={"selected": chosen},
                    results={**metrics_json(1, 2, 3, 4, 5), "selected": chosen})
    (found,) = collect_runs([run])
    assert (found.selected.epoch, found.selected.split) == (0.056, "val")
    out = tmp_path / "rep"
    cli_main(["report", str(run), "--out", str(out), "--no-plots", "--no-cost"])
    assert f"wrote {out / 'results.md'}" in capsys.readouterr().out
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "- checkpoint: epoch 0.056 with the best R@1 on the val split (recorded in test_results.json)\n" in md
    _, rows = table_rows(md)
    assert rows["MoTIS"]["Checkpoint"] == "val, best R@1"


@pytest.mark.parametrize("epoch", [-1, -0.5, "3", True, float("nan")])
def test_a_selected_epoch_that_is_no_count_of_epochs_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], epoch: object) -> None:
    run = write_run(tmp_path / "r", name="r", dataset="rstpreid",
                    results={**metrics_json(1, 2, 3, 4, 5), "selected": {"metric": "r1", "split": "val",
                                                                         "epoch": epoch}})
    with pytest.raises(ReportError, match=r"r/test_results\.json: `selected\.epoch` must be a number of epochs, "
                                          r"0 or more"):
        collect_runs([run])
    with pytest.raises(SystemExit) as e:
        cli_main(["report", str(run), "--out", str(tmp_path / "rep"), "--no-plots"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "got " in err[0]


def test_cli_report_averages_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = write_seeded(tmp_path / "runs")
    cli_main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--no-plots"])
    _, rows = table_rows(capsys.readouterr().out)
    assert rows["CLIP-KD"]["CUHK-PEDES"] == expected_cell(written[("CLIP-KD", "cuhk_pedes")])


# --------------------------------------------------------------------------- mimic runs


def test_mimic_keys_are_curves(tmp_path: Path) -> None:
    history = [{"step": s, "epoch": s / 10, "loss": 1.0 + s, "loss_ce": 1.0 * s, "mimic/job0/teacher0/mse": 0.1 * s,
                "mimic/job0/teacher1/mse": 0.2 * s, "mimic/job0/teacher0/mse/0": 9.0, "mimic/job0/weighted": 0.3 * s,
                "mimic/total": 0.3 * s} for s in (5, 10)]
    run = write_run(tmp_path / "m", name="m", dataset="rstpreid", history=history)
    assert loss_series(run) == {"ce": ([5, 10], [5.0, 10.0]), "mimic/job0/teacher0/mse": ([5, 10], [0.5, 1.0]),
                                "mimic/job0/teacher1/mse": ([5, 10], [1.0, 2.0])}
    assert loss_series(run, weighted=True) == {"mimic/job0": ([5, 10], [1.5, 3.0])}


def test_a_run_saved_before_a_recipe_key_existed_is_a_seed_of_the_same_configuration(tmp_path: Path) -> None:
    """An older run's recipe.yaml lacks a key added since (here contrastive_accumulation); at its
    default it is the same configuration as a newer run's, so their seeds share one cell."""
    root = tmp_path / "runs"
    m1, m2 = metrics_json(10, 20, 30, 40, 50), metrics_json(14, 24, 34, 44, 54)
    for seed, metrics in ((1, m1), (2, m2)):
        folder = root / f"s{seed}"
        write_run(folder, name="x", dataset="synth_pedes", results=metrics)
        saved = yaml.safe_load(dump_recipe(load_recipe("recipes/synth/finetune_itc.yaml",
                                                       [f"seed={seed}", f"training.output_dir={folder}"])))
        if seed == 1:
            assert saved.pop("contrastive_accumulation") == "plain"  # the old run: key not yet recorded
        (folder / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    _, rows = table_rows(results_table(collect_runs([root])))
    assert list(rows) == ["InfoNCE fine-tune (no KD)"]
    s = sample_std([10, 14])
    assert rows["InfoNCE fine-tune (no KD)"]["SynthPEDES"] == (
        f"12.00 ± {s:.2f} / 22.00 ± {s:.2f} / 32.00 ± {s:.2f} / 42.00 ± {s:.2f} (n=2)")

    # a real difference still separates them
    saved["optim"]["lr"] = 1.0e-3
    (root / "s2" / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(ReportError, match=r"differ in optim\.lr"):
        results_table(collect_runs([root]))


def test_seeds_of_a_chained_method_continue_from_their_own_upstream_run(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ours-from-MoTIS at seed S continues from MoTIS at seed S: the checkpoint paths differ, the
    upstream configurations do not, so the two seeds share a cell. A different upstream
    configuration still separates them."""
    monkeypatch.chdir(tmp_path)  # recipes record checkpoint paths relative to where the runs were made
    m = {1: metrics_json(10, 20, 30, 40, 50), 2: metrics_json(12, 22, 32, 42, 52)}
    for seed in (1, 2):
        write_run(Path(f"up/s{seed}"), name="motis", method="MoTIS", dataset="synth_pedes", results=m[seed],
                  recipe_extra={"seed": seed, "loss": {"alpha": 0.9}})
        write_run(Path(f"down/s{seed}"), name="ours", method="Ours", dataset="synth_pedes", results=m[seed],
                  recipe_extra={"seed": seed, "student": {"checkpoint": f"up/s{seed}"}})
    _, rows = table_rows(results_table(collect_runs([Path("down")])))
    assert rows["Ours"]["SynthPEDES"].endswith("(n=2)")

    up2 = yaml.safe_load(Path("up/s2/recipe.yaml").read_text())
    up2["loss"]["alpha"] = 0.5
    Path("up/s2/recipe.yaml").write_text(yaml.safe_dump(up2))
    with pytest.raises(ReportError, match=r"differ in student\.checkpoint\.run\.loss\.alpha"):
        results_table(collect_runs([Path("down")]))


def test_runs_on_differently_generated_data_are_noted(tmp_path: Path) -> None:
    """Two SynthPEDES draws share the column name but not the test set: the table says which runs drew
    which (only the settings that differ), and says nothing when every run drew the same data."""
    def synth(n: int, seed: int = 0) -> dict:
        return {"data": {"name": "synth_pedes", "root": "./data",
                         "synth": {"num_identities": n, "seed": seed, "image_size": [96, 48]}}}

    write_run(tmp_path / "a", name="a", dataset="synth_pedes", method="A", results=metrics_json(10, 20, 30, 10, 5),
              recipe_extra=synth(400))
    write_run(tmp_path / "b", name="b", dataset="synth_pedes", method="B", results=metrics_json(11, 21, 31, 11, 6),
              recipe_extra=synth(400))
    table = results_table(collect_runs([tmp_path]))
    assert "Data:" not in table
    write_run(tmp_path / "c", name="c", dataset="synth_pedes", method="C", results=metrics_json(50, 60, 70, 50, 40),
              recipe_extra=synth(30, seed=3))
    write_run(tmp_path / "d", name="d", dataset="synth_pedes", method="D", results=metrics_json(9, 9, 9, 9, 9))
    table = results_table(collect_runs([tmp_path]))
    (note,) = [p for p in table.split("\n\n") if p.startswith("Data:")]
    assert "the SynthPEDES runs generated their data with 2 different settings" in note
    assert f"num_identities 400, seed 0: {tmp_path / 'a'}, {tmp_path / 'b'}" in note
    assert f"num_identities 30, seed 3: {tmp_path / 'c'}." in note
    assert "image_size" not in note, "only the settings that differ"
    assert str(tmp_path / "d") not in note, "a run that read its data from disk is not compared"
