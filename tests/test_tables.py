"""Metrics files and seed-aggregated tables on the fixture runs in tests/fixtures/metrics/.

Fixture values (mAP@0.5 per seed) and the hand-computed aggregates (sample std, ddof = 1):
  main/turbotrain .70 .72 .74 -> .72 ± .02        main/multistage .60 .64 -> .62 ± .028284
  ablation coopre+pcgrad mask .7: .68 .66 -> .67 ± .014142
  data_efficiency 50 %: none .50 .54 -> .52 ± .028284, coopre .60 .62 -> .61 ± .014142
  main/* prediction per class: car = class mean + .05 EPA / -.1 minADE, pedestrian the opposite, so
  main/turbotrain epa/car .49 .51 .53 -> .51 ± .02, min_ade/pedestrian .9 .85 .8 -> .85 ± .05
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from turbotrain.evaluate.metrics_file import metrics_frame, read_metrics, write_metrics
from turbotrain.report.tables import (
    ablation_table,
    build_table,
    data_efficiency_table,
    efficiency_table,
    main_table,
    transfer_table,
    time_to_target,
    write_table,
)
from turbotrain.utils.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
SQRT2 = math.sqrt(2)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return metrics_frame(sorted(FIXTURES.glob("*/metrics.json")))


def row(table: pd.DataFrame, **keys) -> pd.Series:
    selected = table
    for key, value in keys.items():
        selected = selected[selected[key].isna()] if value is None else selected[selected[key] == value]
    assert len(selected) == 1, f"expected one row for {keys}, got {len(selected)}"
    return selected.iloc[0]


def test_metrics_frame_flattens_one_row_per_run(frame):
    assert len(frame) == 14
    first = frame.set_index("run_id").loc["main-turbotrain-s0"]
    assert first["ap@0.5/car"] == pytest.approx(0.75)
    assert first["map@0.7"] == pytest.approx(0.5)
    assert first["map@0.5/0-30m"] == pytest.approx(0.8)
    assert math.isnan(first["ap@0.5/pedestrian/0-30m"])  # null in the file
    assert (first["min_fde"], first["epa"], first["ap_sort"]) == (1.6, 0.44, "global")
    assert len(first["curve"]) == 3
    assert math.isnan(frame.set_index("run_id").loc["main-multistage-s0", "mask_ratio"])


def test_read_metrics_names_file_and_field(tmp_path):
    document = json.loads((FIXTURES / "main-turbotrain-s0" / "metrics.json").read_text())
    document["run"]["seed"] = "3"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"bad\.json: field 'run/seed'") as info:
        read_metrics(bad)
    assert info.value.got == "3"

    del document["training"]["wall_s"]
    document["run"]["seed"] = 3
    bad.write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"field 'training/wall_s': expected a value \(required"):
        read_metrics(bad)

    bad.write_text("{not json")
    with pytest.raises(DataError, match="valid JSON"):
        read_metrics(bad)


def test_write_metrics_validates_before_writing(tmp_path):
    document = read_metrics(FIXTURES / "main-turbotrain-s0" / "metrics.json")
    target = tmp_path / "run" / "metrics.json"
    run = {**document["run"], "label_fraction": 1.5}
    with pytest.raises(DataError, match="run/label_fraction"):
        write_metrics(target, run, document["detection"], document["prediction"], document["training"])
    assert not target.exists()
    run = {k: v for k, v in document["run"].items() if k != "run_id"}
    write_metrics(target, run, document["detection"], {}, document["training"])
    assert read_metrics(target)["prediction"] == {}
    # Without an explicit run_id the metrics path (minus .json) identifies the run.
    assert metrics_frame([target])["run_id"].tolist() == [str(tmp_path / "run" / "metrics")]


def test_build_table_mean_std_over_seeds(frame):
    table = build_table(frame[frame.experiment == "main"], ["variant"], ["map@0.5", "epa"])
    assert list(table.columns) == ["variant", "map@0.5_mean", "map@0.5_std", "map@0.5_n", "epa_mean", "epa_std", "epa_n",
                                   "map@0.5_ci_low", "map@0.5_ci_high", "epa_ci_low", "epa_ci_high", "n_seeds"]
    turbo, multi = row(table, variant="turbotrain"), row(table, variant="multistage")
    assert (turbo["map@0.5_mean"], turbo["map@0.5_std"], turbo["n_seeds"]) == pytest.approx((0.72, 0.02, 3))
    assert (multi["map@0.5_mean"], multi["map@0.5_std"], multi["n_seeds"]) == pytest.approx((0.62, 0.02 * SQRT2, 2))
    assert (multi["epa_mean"], multi["epa_std"]) == pytest.approx((0.41, 0.01 * SQRT2))


def test_build_table_rejects_ambiguous_rows_and_unknown_columns(frame):
    with pytest.raises(ConfigError, match="do not identify runs uniquely"):
        build_table(frame, ["experiment"], ["map@0.5"])
    with pytest.raises(ConfigError, match="lacks"):
        build_table(frame, ["variant"], ["map@0.9"])


def test_write_table_csv_and_markdown(frame, tmp_path):
    table = build_table(frame[frame.experiment == "main"], ["variant"], ["map@0.5", "wall_s"])
    csv_path, md_path = write_table(table, tmp_path / "t.csv", note="a note")
    assert md_path == tmp_path / "t.md"
    assert pd.read_csv(csv_path)["map@0.5_mean"].tolist() == pytest.approx([0.62, 0.72])
    markdown = md_path.read_text()
    # 3 seeds, std 0.02: t(0.975, 2) = 4.303, half-width 4.303 * 0.02 / sqrt(3) = 0.0497
    assert "| turbotrain | 0.720 ± 0.020 [0.670, 0.770] | 1900 ± 100 [1652, 2148] | 3 |" in markdown
    assert markdown.rstrip().endswith("a note")


def test_main_table_states_sort_order(frame, tmp_path):
    table = main_table(frame, tmp_path / "main.csv", experiment="main")
    assert row(table, variant="turbotrain")["min_fde_mean"] == pytest.approx(1.5)
    assert "map@0.3_mean" not in table.columns  # no run reports it
    assert "AP detections sorted: global" in (tmp_path / "main.md").read_text()
    assert "Ground-truth boxes" not in (tmp_path / "main.md").read_text()  # the fixtures predate the rule


def test_tables_say_which_ground_truth_range_rule_the_runs_used(frame, tmp_path):
    ruled = frame.assign(gt_range_rule="all_corners")
    main_table(ruled, tmp_path / "main.csv", experiment="main")
    assert "Ground-truth boxes: all_corners inside the range" in (tmp_path / "main.md").read_text()


def test_ablation_table_rows_pretrain_balancer_and_mask_ratio(frame, tmp_path):
    table = ablation_table(frame, tmp_path / "ablation.csv", experiment="ablation")
    assert len(table) == 4
    swept = row(table, pretrain="coopre", balancer="pcgrad", mask_ratio=0.7)
    assert (swept["map@0.5_mean"], swept["map@0.5_std"], swept["n_seeds"]) == pytest.approx((0.67, 0.01 * SQRT2, 2))
    assert row(table, pretrain="none", balancer="sum", mask_ratio=None)["epa_mean"] == pytest.approx(0.38)
    assert "| none | pcgrad | – | schedule | 0.610 |" in (tmp_path / "ablation.md").read_text()


def test_data_efficiency_table(frame, tmp_path):
    table = data_efficiency_table(frame, tmp_path / "data_efficiency.csv", experiment="data_efficiency")
    coopre, none = row(table, pretrain="coopre"), row(table, pretrain="none")
    assert (coopre["map@0.5_mean"], coopre["map@0.5_std"]) == pytest.approx((0.61, 0.01 * SQRT2))
    assert (none["map@0.5_mean"], none["map@0.5_std"]) == pytest.approx((0.52, 0.02 * SQRT2))
    with pytest.raises(ConfigError, match="no run of experiment"):
        data_efficiency_table(frame, tmp_path / "x.csv", experiment="missing")


def test_time_to_target_takes_first_point_reaching_it():
    curve = [{"step": 200, "wall_s": 1200, "ap50": 0.65}, {"step": 100, "wall_s": 600, "ap50": 0.5}]
    assert time_to_target(curve, "ap50", 0.6) == 1200
    assert math.isnan(time_to_target(curve, "ap50", 0.9))
    assert math.isnan(time_to_target(curve, "epa", 0.1))


def test_efficiency_table_time_to_target_and_benchmarks(frame, tmp_path):
    # Curves: turbotrain s0 ap50 .50/.65/.70 at 600/1200/1800 s; multistage s0 .40/.55/.60 at
    # 900/1800/2700 s. Default target = lowest best = .60 -> 1200 s and 2700 s.
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    pretrain, finetune = tmp_path / "pretrain.tsv", tmp_path / "finetune.tsv"
    pretrain.write_text(header + "100.0\t0:01:40\t2048.0\t-\t-\t-\t-\t-\t90.0\t90.0\n")
    finetune.write_text(header + "200.0\t0:03:20\t1024.0\t-\t-\t-\t-\t-\t95.0\t190.0\n"
                                 "300.0\t0:05:00\t1536.0\t-\t-\t-\t-\t-\t95.0\t290.0\n")
    table = efficiency_table(frame, tmp_path / "efficiency.csv", experiment="main",
                             benchmarks={"main-turbotrain-s0": [pretrain, finetune]})
    turbo, multi = row(table, variant="turbotrain"), row(table, variant="multistage")
    assert turbo["time_to_ap50_s_mean"] == 1200 and multi["time_to_ap50_s_mean"] == 2700
    assert turbo["time_to_epa_s_mean"] == 1200  # EPA target .40
    assert turbo["bench_s_mean"] == pytest.approx(100 + 250)  # sum of stages, mean over repeats
    assert turbo["bench_max_rss_mb_mean"] == 2048
    assert math.isnan(multi["bench_s_mean"])
    assert "ap50 >= 0.600" in (tmp_path / "efficiency.md").read_text()


def test_fixture_folder_is_not_modified(tmp_path, frame):
    # The builders must only write where they are told.
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURES, copy)
    main_table(metrics_frame(sorted(copy.glob("*/metrics.json"))), tmp_path / "out" / "main.csv", experiment="main")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in FIXTURES.iterdir())


def test_main_table_reports_ap_per_class_and_iou_and_training_hours(frame, tmp_path):
    table = main_table(frame, tmp_path / "main.csv", experiment="main")
    per_class = [c for c in table.columns if c.startswith("ap@") and c.endswith("_mean")]
    expected = {f"{c}_mean" for c in frame.columns if c.startswith("ap@") and c.count("/") == 1}
    assert expected and set(per_class) == expected and "ap@0.5/car_mean" in expected
    assert not any("m/" in c or c.count("/") > 1 for c in per_class)  # no per-range columns here
    assert {"cpu_hours_mean", "gpu_hours_mean", "min_ade_mean", "mr_mean", "epa_mean"} <= set(table.columns)


def test_main_table_reports_prediction_metrics_per_class_and_their_class_means(frame, tmp_path):
    first = frame.set_index("run_id").loc["main-turbotrain-s0"]
    assert (first["epa/car"], first["epa/pedestrian"], first["epa"]) == pytest.approx((0.49, 0.39, 0.44))
    assert first["epa_raw/car"] == pytest.approx(0.49)
    table = main_table(frame, tmp_path / "main.csv", experiment="main")
    turbo = row(table, variant="turbotrain")
    assert (turbo["epa/car_mean"], turbo["epa/car_std"]) == pytest.approx((0.51, 0.02))
    assert (turbo["min_ade/pedestrian_mean"], turbo["min_ade/pedestrian_std"]) == pytest.approx((0.85, 0.05))
    expected = {f"{metric}/{name}_mean" for metric in ("epa", "epa_raw", "min_ade", "min_fde", "mr")
                for name in ("car", "pedestrian")}
    assert expected | {"epa_mean", "epa_raw_mean"} <= set(table.columns)
    markdown = (tmp_path / "main.md").read_text()
    assert " epa/car | epa/pedestrian |" in markdown.splitlines()[0]
    assert "EPA = max(EPA_raw, 0)" in markdown


def _transfer_metrics(tmp_path, pretrain_type, data, seed, map50):
    document = json.loads((FIXTURES / "main-turbotrain-s0" / "metrics.json").read_text())
    run = {**document["run"], "pretrain": f"{pretrain_type}_{data}", "pretrain_type": pretrain_type,
           "pretrain_data": data, "seed": seed, "run_id": f"{pretrain_type}-{data}-{seed}"}
    document["detection"]["map"]["0.5"] = map50
    path = tmp_path / f"{run['run_id']}.json"
    write_metrics(path, run, document["detection"], document["prediction"], document["training"])
    return path


def test_transfer_table_rows_are_pretraining_objective_and_data(tmp_path):
    paths = [_transfer_metrics(tmp_path, "none", "–", 0, 0.5),
             _transfer_metrics(tmp_path, "trajectory", "A", 0, 0.6), _transfer_metrics(tmp_path, "trajectory", "A", 1, 0.62),
             _transfer_metrics(tmp_path, "trajectory", "B", 0, 0.55),
             _transfer_metrics(tmp_path, "trajectory", "A+B", 0, 0.65)]
    frame = metrics_frame(paths)
    table = transfer_table(frame, tmp_path / "transfer.csv")
    assert len(table) == 4
    assert row(table, pretrain_type="trajectory", pretrain_data="A")["map@0.5_mean"] == pytest.approx(0.61)
    assert row(table, pretrain_type="trajectory", pretrain_data="A+B")["n_seeds"] == 1
    assert row(table, pretrain_type="none", pretrain_data="–")["map@0.5_mean"] == pytest.approx(0.5)
    markdown = (tmp_path / "transfer.md").read_text()
    assert "Fine-tuned and evaluated on" in markdown and "| trajectory | A+B |" in markdown


def test_runs_without_pretraining_provenance_read_as_their_own_dataset(frame):
    # metrics files written before pretrain_type / pretrain_data existed
    first = frame.set_index("run_id").loc["main-turbotrain-s0"]
    assert first["pretrain_type"] == first["pretrain"]
    assert first["pretrain_data"] == (first["dataset"] if first["pretrain"] != "none" else "–")


def test_the_ablation_table_splits_rows_by_label_fraction_where_runs_differ_in_it(frame, tmp_path):
    from turbotrain.report.tables import ablation_table

    runs = frame[np.isclose(frame["label_fraction"], 1.0)]
    runs = runs[runs["pretrain"] == runs["pretrain"].iloc[0]].copy()
    half = runs.copy()
    half["label_fraction"] = 0.5
    table = ablation_table(pd.concat([runs, half], ignore_index=True), tmp_path / "ablation.csv")
    assert "label_fraction" in table.columns and set(table["label_fraction"]) == {0.5, 1.0}
    assert "label_fraction" not in ablation_table(runs, tmp_path / "one.csv").columns


def test_table_captions_name_the_head_and_the_fusion_implementation():
    from turbotrain.config import load_config
    from turbotrain.report.tables import model_caption

    from pipeline_helpers import REPO_ROOT

    model = load_config(REPO_ROOT / "config" / "config.yaml")["model"]
    caption = model_caption(model, ["attfuse", "v2xvit"])
    assert "detection head `center`" in caption and "`warp_features`" in caption
    assert "`attfuse` = OpenCOOD's AttFusion" in caption and "`v2xvit` = V2X-ViT" in caption
