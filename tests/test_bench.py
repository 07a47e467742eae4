"""The benchmark scripts run end to end at their smallest settings (no figures checked:
speed is measured by the scripts themselves, not by tests)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    assert "failed" not in out


def test_train_step_writes_its_figures_as_json(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_step
    finally:
        sys.path.remove(str(ROOT / "bench"))
    path = tmp_path / "out" / "figures.json"
    figures = train_step.main(["--warmup", "1", "--steps", "1", "--repeats", "2", "--json", str(path),
                               "--set", "batch_size=2", "max_frames=2", "image_size=32",
                               "tiny_patch=16", "tiny_width=64", "tiny_layers=1"])
    assert json.loads(path.read_text()) == figures
    assert figures["clips_per_s"] > 0 and len(figures["clips_per_s_windows"]) == 2
    assert (figures["batch_size"], figures["max_frames"], figures["image_size"]) == (2, 2, 32)   # --set reached the run
    assert figures["machine"] and figures["threads"] >= 1 and figures["torch"] == __import__("torch").__version__
    assert figures["command"].startswith("python bench/train_step.py --warmup 1")


def test_readme_performance_table_is_what_report_generates():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    readme = (ROOT / "README.md").read_text()
    assert report.rewrite(readme, report.render(ROOT / "docs" / "results")) == readme, \
        "README's performance table is stale: run `python bench/report.py`"
    rows, baseline = report.table_rows(report.load_results(ROOT / "docs" / "results"))
    assert baseline and any(row["source"].startswith("quoted") for row in rows)
