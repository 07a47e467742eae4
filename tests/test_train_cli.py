"""The entry points end to end on a tiny synthetic set: `torchrun` with 2 CPU processes
(gloo), the evaluation CLI, and the data checks that run before any work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emcl_nb.data.inputs import DataNotFoundError
from emcl_nb.data.prepare import ensure_data, split_statistics
from emcl_nb.params import load_params

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(tmp_path, *changes: str) -> list[str]:
    """The tiny synthetic run's overrides, with `changes` ("key=value") replacing its values
    (a key given twice is an error)."""
    changed = dict(change.split("=", 1) for change in changes)
    return [item for item in _tiny_overrides(tmp_path) if item.split("=", 1)[0] not in changed] + list(changes)


def _tiny_overrides(tmp_path) -> list[str]:
    return [f"anno_path={tmp_path}/data", f"video_path={tmp_path}/data/videos",
            f"output_root={tmp_path}/outputs", "synthetic_train=16", "synthetic_val=4",
            "synthetic_test=6", "synthetic_frames=6", "synthetic_size=32", "image_size=32",
            "tiny_width=64", "tiny_layers=1", "emcl_bases=4", "emcl_stages=2", "max_frames=2",
            "max_words=12", "batch_size=8", "batch_size_val=8", "epochs=2", "num_workers=0",
            "num_threads=1", "progress=false", "run=cli"]


def _env():
    env = dict(os.environ)
    env.pop("EMCL_NB_OVERRIDES", None)
    return env


def test_torchrun_two_cpu_processes_train_and_only_rank_zero_writes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--standalone", "-m", "emcl_nb.train", "--params", "synthetic",
               "--set", *tiny_overrides(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "synthetic" / "cli"
    history = json.loads((run_dir / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    assert "val" in history[-1]
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    log = (run_dir / "log.jsonl").read_text().splitlines()
    assert len(log) == len({json.loads(line)["step"] for line in log})    # one writer: no duplicate steps
    assert done.stdout.count("epoch 2/2") == 1                             # only rank 0 reports

    evaluated = subprocess.run([sys.executable, "-m", "emcl_nb.evaluate", "--params", "synthetic",
                                "--set", *tiny_overrides(tmp_path)],
                               cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["results"]["last"]["n_videos"] == 6
    assert "| last (epoch 2) |" in evaluated.stdout


def test_missing_real_data_is_named_before_any_work(tmp_path):
    params = load_params("msvd", [f"anno_path={tmp_path}/anns", f"video_path={tmp_path}/videos"],
                         use_env=False)
    with pytest.raises(DataNotFoundError) as error:
        ensure_data(params)
    message = str(error.value)
    assert "raw-captions.pkl" in message and "train_list.txt" in message and "anno_path" in message


def _command(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m emcl_nb.<module> ...` run through its main(), reporting its exit status and
    whether torch was imported by then."""
    code = (f"import sys\nfrom emcl_nb.{module} import main\ntry:\n    main({list(args)!r})\n"
            "except SystemExit as exit:\n    print('exit', exit.code, 'torch' in sys.modules)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)


def test_the_train_command_names_every_missing_input_at_once_before_torch_loads(tmp_path):
    done = _command("train", "--params", "msrvtt", "--set", f"clip_cache={tmp_path}/clip",
                    f"anno_path={tmp_path}/annotations", f"video_path={tmp_path}/videos")
    assert done.stdout.split() == ["exit", "2", "False"], done.stdout + done.stderr
    assert "3 input(s) missing" in done.stderr and "Traceback" not in done.stderr
    for named in ("ViT-B-32.pt", "MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv", "video_path="):
        assert named in done.stderr, named


def test_command_errors_are_one_line_unless_a_traceback_is_asked_for():
    done = _command("evaluate", "--params", "synthetic", "--set", "lr=-1")
    assert done.stdout.split()[:2] == ["exit", "2"]
    assert done.stderr.startswith("[emcl_nb] error: parameter 'lr'") and "Traceback" not in done.stderr
    shown = _command("evaluate", "--params", "synthetic", "--traceback", "--set", "lr=-1")
    assert "Traceback" in shown.stderr and "ParamsError" in shown.stderr


def test_split_statistics_of_the_synthetic_set(tmp_path):
    params = load_params("synthetic", tiny_overrides(tmp_path), use_env=False)
    ensure_data(params, progress=False)
    table = split_statistics(params)
    assert "| train | 16 | 48 | 3.0 |" in table           # 3 paraphrases per training video
    assert "| test | 6 | 6 | 1.0 |" in table


def test_a_finished_run_is_reused_only_with_its_own_parameters(tmp_path):
    from emcl_nb.training.checks import TrainingSetupError
    from emcl_nb.training.run import ensure_trained

    params = load_params("synthetic", tiny_overrides(tmp_path, "epochs=1"), use_env=False)
    last = ensure_trained(params)                       # trains
    stamp = last.stat().st_mtime_ns
    assert ensure_trained(params) == last and last.stat().st_mtime_ns == stamp   # reused as is
    with pytest.raises(TrainingSetupError, match="synthetic_train: 16 -> 24"):
        ensure_trained(params.replace(synthetic_train=24))   # drawn from another synthetic set
    with pytest.raises(TrainingSetupError, match="lr: 0.0005 -> 0.001"):
        ensure_trained(params.replace(lr=1e-3))               # another recipe
    # what evaluation may change, and the model fields (taken from the checkpoint)
    assert ensure_trained(params.replace(max_frames=4, precision="fp32", seed=5, emcl_bases=8)) == last


def test_evaluation_evaluates_a_run_trained_otherwise_and_never_trains(tmp_path, capsys):
    """Evaluation (CLI, notebooks 03-06) takes any trained run: other recipe settings given
    now are noted, not refused; a run without a checkpoint is an error saying how to train it,
    and nothing is trained or written for it."""
    from emcl_nb.evaluation.run import evaluate_run
    from emcl_nb.training.checkpoint import CheckpointError
    from emcl_nb.training.run import train

    params = load_params("synthetic", tiny_overrides(tmp_path, "epochs=1"), use_env=False)
    train(params)
    capsys.readouterr()
    summary = evaluate_run(params.replace(lr=1e-3, batch_size=4), ("last",))
    assert summary["results"]["last"]["n_texts"] == 6
    out = capsys.readouterr().out
    assert "other settings than the parameters given now (batch_size: 8 -> 4, lr: 0.0005 -> 0.001)" in out
    summary_line = next(line for line in out.splitlines() if line.startswith("[emcl_nb] evaluation took"))
    for part in ("load checkpoints", "encode texts", "encode videos", "score", "write"):
        assert part in summary_line, summary_line
    untrained = params.replace(run="never-trained")
    with pytest.raises(CheckpointError, match="evaluation does not train: train it first"):
        evaluate_run(untrained)
    assert not untrained.out_dir.exists()


@pytest.fixture
def loaders_kept_alive(monkeypatch):
    """Something in the kernel keeps the loaders referenced after training or evaluation
    returns, as tqdm's notebook widget did (its widget model, alive in the kernel, held
    the loader)."""
    from emcl_nb.evaluation import encode
    from emcl_nb.progress import progress_bar
    from emcl_nb.training import engine
    kept = []

    def holding_bar(iterable=None, **kwargs):
        kept.append(iterable)
        return progress_bar(iterable, **kwargs)
    for module in (engine, encode):
        monkeypatch.setattr(module, "progress_bar", holding_bar)
    return kept


def _in_process_params(tmp_path, *extra):
    return load_params("synthetic", tiny_overrides(tmp_path, "num_workers=2", "epochs=1", *extra),
                       use_env=False)


def test_train_leaves_no_worker_processes_behind(tmp_path, capsys, loaders_kept_alive):
    """A notebook kernel calls train() in-process: its loader workers (training and the
    per-epoch validation) must be gone when it returns, not at some garbage collection."""
    import multiprocessing

    from emcl_nb.training.run import train

    params = _in_process_params(tmp_path)
    train(params)
    assert multiprocessing.active_children() == []
    train(params)                               # a finished run: nothing to do, and says so
    assert ("run cli is complete: 1/1 epochs, 6/6 steps; train with --no-resume to retrain "
            "(the earlier checkpoints are kept aside)") in capsys.readouterr().out


def test_train_leaves_no_worker_processes_behind_after_an_error(tmp_path, monkeypatch,
                                                                loaders_kept_alive):
    import multiprocessing

    from emcl_nb.training import checkpoint
    from emcl_nb.training.run import train

    def fail(*args, **kwargs):
        raise OSError("disk gone")
    monkeypatch.setattr(checkpoint, "save_checkpoint", fail)
    with pytest.raises(OSError, match="disk gone"):
        train(_in_process_params(tmp_path))
    assert multiprocessing.active_children() == []


def test_evaluation_leaves_no_worker_processes_behind(tmp_path, loaders_kept_alive):
    import multiprocessing

    from emcl_nb.evaluation.run import evaluate_run
    from emcl_nb.training.run import train

    params = _in_process_params(tmp_path)
    train(params)
    evaluate_run(params, ("last",), cache=False)
    assert multiprocessing.active_children() == []
