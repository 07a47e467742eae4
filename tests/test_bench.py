"""The benchmark scripts run end to end at their smallest settings, and the README's
performance table is what bench/report.py computes from docs/results (its ratios checked on
made-up figures). No speed is checked: the scripts measure it, tests do not."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emcl_nb.analysis.readme import replace_section

ROOT = Path(__file__).resolve().parents[1]


def import_bench(name: str):
    """A script of bench/ as a module (they import each other from their folder)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_gpu_check_without_cuda_runs_the_cpu_presets_and_says_so():
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
           "GPU_CHECK_SMOKE": "1"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "No CUDA device: running the small CPU presets instead" in out
    assert "clips/s" in out and "TFLOP/step" in out and "MFU =" in out      # training, FLOPs, formula
    assert "loop / batched" in out                                          # evaluation
    assert "cache / decord" in out                                          # loader with and without the cache
    assert "device augmentation / loader augmentation:" in out             # augmented loader, both ways
    assert "the GPU would wait" in out                                      # data path against the step
    assert "failed" not in out


def test_train_step_writes_its_figures_as_json(tmp_path):
    train_step = import_bench("train_step")
    path = tmp_path / "out" / "figures.json"
    figures = train_step.main(["--warmup", "1", "--steps", "1", "--repeats", "2", "--json", str(path),
                               "--set", "batch_size=2", "max_frames=2", "image_size=32",
                               "tiny_patch=16", "tiny_width=64", "tiny_layers=1"])
    assert json.loads(path.read_text()) == figures
    assert figures["clips_per_s"] > 0 and len(figures["clips_per_s_windows"]) == 2
    assert (figures["batch_size"], figures["max_frames"], figures["image_size"]) == (2, 2, 32)   # --set reached the run
    assert figures["machine"] and figures["threads"] >= 1 and figures["torch"] == __import__("torch").__version__
    assert figures["command"].startswith("python bench/train_step.py --warmup 1")


def test_search_bench_times_one_query_and_writes_its_figures(tmp_path):
    path = tmp_path / "search.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "search.py"), "--videos", "100", "--dim", "32",
                          "--frames", "4", "--bases", "4", "--stages", "2", "--repeats", "2", "--max-blocks", "2",
                          "--device", "cpu", "--json", str(path)],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(path.read_text())
    settings = figures["results"][0]["settings"]
    assert figures["benchmark"] == "search" and figures["videos"] == 100 and set(settings) == {"default (32)", "2"}
    assert all(len(s["runs_s"]) == 2 and s["median_s"] > 0 for s in settings.values())
    report = import_bench("report")
    table = "\n".join(report.search_table([figures | {"file": "search.json"}]))
    assert "| cpu | 100 | default (32) |" in table and "measured: search.json" in table


@pytest.mark.parametrize("option", ["--warmup", "--steps", "--repeats"])
def test_train_step_refuses_a_count_below_one(capsys, option):
    train_step = import_bench("train_step")
    with pytest.raises(SystemExit) as exit_info:
        train_step.main([option, "0"])
    assert exit_info.value.code == 2 and f"argument {option}: must be at least 1; got 0" in capsys.readouterr().err


def assert_readme_section_is(name: str, body: str, command: str) -> None:
    """README.md's section `name` is `body`, else the command that rewrites it is named."""
    readme = (ROOT / "README.md").read_text()
    assert replace_section(readme, name, body) == readme, f"README's {name} section is stale: run `{command}`"


def read_result(name: str) -> dict:
    return json.loads((ROOT / "docs" / "results" / name).read_text())


def test_readme_performance_table_is_what_report_generates():
    report = import_bench("report")
    assert_readme_section_is("perf-results", report.render(ROOT / "docs" / "results"), "python bench/report.py")
    rows = report.table_rows(report.load_results(ROOT / "docs" / "results"))
    standalone = [row for row in rows if row["label"].startswith("this project, preset")]
    assert standalone and all(row["ratio"] for row in standalone)      # they have a reference to divide by
    assert any(row["source"].startswith("quoted") for row in rows)


def test_readme_regime_table_is_what_its_measurement_file_gives():
    regime = import_bench("reference_regime")
    result = read_result("reference-regime.json")
    assert_readme_section_is("regime-results", regime.render(result), "python bench/reference_regime.py")
    assert [row["gradient_std"] for row in result["update"]] == list(regime.GRADIENT_STDS)


def test_readme_encoding_rate_is_what_its_measurement_file_gives():
    encode = import_bench("encode_speed")
    result = read_result("encode-vit-b32-cpu.json")
    assert_readme_section_is("encode-results", encode.render(result),
                             "python bench/encode_speed.py --json <its results file>")
    assert result["best"] == max(result["rows"], key=lambda row: row["frames_per_s"])


def test_regime_measurements_of_the_layer_norm_and_the_frame_choice_run():
    """The small measurements end to end (the update table takes longer and runs in the script)."""
    regime = import_bench("reference_regime")
    ln = regime.layer_norm_eps(width=64)
    assert 0 < ln["mean_abs_difference"] < ln["max_abs_difference"] < 1e-2
    numbered = regime.numbered_frames(6)
    assert numbered.shape == (6, 80, 160, 3) and (numbered[5, :40, :16] == 255).all()   # bit 0 of 5 is 1


def test_report_divides_each_row_by_the_reference_measured_with_it():
    """Side-by-side rows by their own reference, quoted rows by the quoted baseline, standalone
    runs by the side-by-side reference."""
    report = import_bench("report")
    side = {"benchmark": "reference_side_by_side", "file": "side.json", "machine": "cpu", "threads": 2,
            "load_average_1min": [0.1, 0.2], "configuration": {"reference_anomaly_mode": False},
            "rounds": [{"ours": 60.0, "reference": 30.0}, {"ours": 80.0, "reference": 40.0}],
            "ours_clips_per_s": 70.0, "reference_clips_per_s": 35.0, "command": "python bench/x.py"}
    quoted = {"kind": "quoted", "file": "quoted.json", "machine": "cpu",
              "rows": [{"label": "ref", "clips_per_s_runs": [20.0], "baseline": True, "how": "by hand"},
                       {"label": "old", "clips_per_s_runs": [10.0], "how": "by hand"}]}
    alone = {"benchmark": "train_step", "file": "alone.json", "machine": "cpu", "threads": 2, "preset": "p",
             "clips_per_s": 52.5, "clips_per_s_windows": [52.5], "ms_per_step": 1.0, "peak_memory_gib": 1.0,
             "peak_memory_kind": "RSS", "command": "python bench/train_step.py", "compile": True,
             "first_step_seconds": 60.0}
    anomaly = side | {"file": "side-anomaly.json", "configuration": {"reference_anomaly_mode": True},
                      "reference_clips_per_s": 25.0}
    rows = report.table_rows([anomaly, side, quoted, alone])
    assert rows[-1]["ratio"] == 52.5 / 35.0                    # never the reference with anomaly mode on (25)
    assert [round(row["ratio"], 3) for row in rows] == [1.0, 2.8, 1.0, 2.0, 1.0, 0.5, 1.5]
    assert rows[2]["runs"] == [30.0, 40.0] and rows[3]["runs"] == [60.0, 80.0]
    assert "compile=true (first step 60 s, cold compile cache)" in rows[-1]["label"]


def test_report_tables_only_the_loader_bench_run_with_cache():
    """A `bench/data_loading.py --json` file made without --cache (project vs reference, no
    rounds) is no row of either table."""
    report = import_bench("report")
    without_cache = {"benchmark": "data_loading_reference", "file": "loader.json",
                     "clips_per_s": {"project": 50.0, "reference": 10.0},
                     "mib_per_batch": {"project": 7.0, "reference": 110.0}}
    with_cache = json.loads((ROOT / "docs" / "results" / "data_loading-cpu.json").read_text()) | {"file": "c.json"}
    assert report.table_rows([without_cache]) == [] and report.loader_table([without_cache]) == []
    lines = report.loader_table([without_cache, with_cache])
    assert [line.split(" | ")[0] for line in lines if line.endswith("measured: c.json |")] == ["| decord", "| cache"]


def test_report_tables_the_augmented_loader_rows_and_their_ratio():
    report = import_bench("report")
    augmented = read_result("data_loading-augment-cpu.json") | {"file": "a.json"}
    lines = report.loader_table([augmented])
    assert [line.split(" | ")[0] for line in lines if line.endswith("measured: a.json |")] == [
        "| loader augmentation", "| device augmentation (on cpu, in the training process)"]
    ratio = augmented["device_over_loader_augmentation"]
    assert lines[-1] == f"Device augmentation over loader augmentation: {ratio:.2f}x (a.json)."


def test_data_wait_is_the_share_of_the_step_without_data():
    data_wait = import_bench("data_wait")
    assert data_wait.wait_share(step_rate=1000, data_rate=250) == 0.75
    assert data_wait.wait_share(step_rate=100, data_rate=400) == 0.0


# The reference's argument-parser defaults (jpthu17/EMCL main_retrieval.py), with the preset's configuration.
REFERENCE_SETTINGS = {"batch_size": 16, "max_words": 32, "max_frames": 12, "agg_module": "seqTransf",
                      "num_hidden_layers": 2, "temp": 3, "centerK": 32, "stage_num": 9, "momentum": 0.9,
                      "lamd": 1, "beta": 3}


@pytest.mark.parametrize("only_reference", [False, True])
@pytest.mark.parametrize("folder, problem", [("no-such-folder", "does not exist"),
                                             (".", "is not the video_retrieval/EMCL-Net folder")])
def test_side_by_side_names_a_wrong_reference_folder_and_the_fix(capsys, folder, problem, only_reference):
    side_by_side = import_bench("reference_side_by_side")
    path = (ROOT / folder).resolve()
    with pytest.raises(SystemExit) as exit_info:
        side_by_side.main(["--reference", str(path), *(["--only-reference"] if only_reference else [])])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert f"--reference {path} {problem}" in message
    assert "git clone https://github.com/jpthu17/EMCL" in message
    assert "--reference EMCL/video_retrieval/EMCL-Net" in message


def test_side_by_side_points_from_the_repository_to_its_folder(tmp_path):
    side_by_side = import_bench("reference_side_by_side")
    (tmp_path / "video_retrieval" / "EMCL-Net").mkdir(parents=True)
    with pytest.raises(side_by_side.ReferenceNotFoundError, match="pass .*/video_retrieval/EMCL-Net"):
        side_by_side.check_reference_folder(tmp_path)


def test_the_preset_does_the_work_of_the_reference_defaults():
    side_by_side = import_bench("reference_side_by_side")
    params = side_by_side.preset_params()
    assert side_by_side.setting_differences(params, REFERENCE_SETTINGS) == {}
    assert side_by_side.setting_differences(params.replace(emcl_stages=5, decay_exempt="norms"), REFERENCE_SETTINGS) \
        == {"emcl_stages": {"ours": 5, "reference": 9}, "decay_exempt": {"ours": "norms", "reference": "reference"}}


def test_side_by_side_alternates_and_writes_medians_and_ratio(tmp_path, monkeypatch, capsys):
    side_by_side = import_bench("reference_side_by_side")
    calls, speeds = [], {"ours": iter([40.0, 44.0, 42.0]), "reference": iter([20.0, 22.0, 30.0])}

    def fake_timer(command, json_path):
        side = "ours" if command[0] == "bench/train_step.py" else "reference"
        calls.append(side)
        assert ("--preset" in command, "--anomaly" in command) == (side == "ours", side == "reference")
        return {"clips_per_s": next(speeds[side]), "ms_per_step": 1.0, "settings": REFERENCE_SETTINGS}

    monkeypatch.setattr(side_by_side, "check_reference_folder", lambda path: ROOT)   # a git work tree
    monkeypatch.setattr(side_by_side, "run_timer", fake_timer)
    path = tmp_path / "out" / "side.json"
    figures = side_by_side.main(["--reference", str(tmp_path), "--rounds", "3", "--steps", "1", "--anomaly",
                                 "--json", str(path)])
    assert calls == ["ours", "reference"] * 3
    assert json.loads(path.read_text()) == figures
    assert figures["rounds"] == [{"ours": 40.0, "reference": 20.0}, {"ours": 44.0, "reference": 22.0},
                                 {"ours": 42.0, "reference": 30.0}]
    assert (figures["ours_clips_per_s"], figures["reference_clips_per_s"], figures["ratio"]) == (42.0, 22.0, 1.909)
    assert figures["configuration"]["reference_anomaly_mode"] and figures["configuration"]["setting_differences"] == {}
    assert figures["reference_commit"] == side_by_side.reference_commit(ROOT) and len(figures["load_average_1min"]) == 2
    assert figures["command"].startswith("python bench/reference_side_by_side.py --reference")
    out = capsys.readouterr().out
    assert "round 3/3: ours 42.0 clips/s" in out and "ours / reference 1.91" in out
