"""TensorBoard logging of training (tensorboard=true): the event files are read back with
TensorBoard's own EventAccumulator and hold what log.jsonl and history.json hold."""
import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from emcl_nb.params import load_params
from emcl_nb.training.checks import TrainingSetupError
from emcl_nb.training.run import train
from tests.test_train_cli import tiny_overrides


def scalars(folder) -> dict[str, list]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_training_writes_event_files_with_the_loss_rates_recall_logit_scale_and_rank(tmp_path):
    params = load_params("synthetic", tiny_overrides(tmp_path, "tensorboard=true"), use_env=False)
    result = train(params)
    logged = scalars(result.out_dir / "tensorboard")
    log = [json.loads(line) for line in (result.out_dir / "log.jsonl").read_text().splitlines()]
    history = json.loads((result.out_dir / "history.json").read_text())

    assert [e.step for e in logged["train/loss"]] == [r["step"] for r in log]
    assert [e.value for e in logged["train/loss"]] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    groups = sorted(key.removeprefix("lr_") for key in log[0] if key.startswith("lr_"))
    assert groups and all(f"lr/{group}" in logged for group in groups)
    assert [e.value for e in logged[f"lr/{groups[0]}"]] == pytest.approx([r[f"lr_{groups[0]}"] for r in log])
    for direction in ("t2v", "v2t"):
        for metric in ("R1", "R5", "R10", "MdR"):
            values = [e.value for e in logged[f"val/{direction}_{metric}"]]
            assert values == pytest.approx([record["val"][direction][metric] for record in history])
    assert [e.step for e in logged["val/t2v_R1"]] == [record["step"] for record in history]
    assert [e.value for e in logged["model/logit_scale"]] == pytest.approx([r["logit_scale"] for r in history])
    ranks = [e.value for e in logged["model/emcl_correction_rank"]]
    assert ranks == [record["emcl_rank"] for record in history] and all(1 <= rank <= 64 for rank in ranks)


def test_no_event_files_unless_asked(tmp_path):
    params = load_params("synthetic", tiny_overrides(tmp_path, "epochs=1"), use_env=False)
    result = train(params)
    assert not (result.out_dir / "tensorboard").exists()
    assert "logit_scale" in json.loads((result.out_dir / "history.json").read_text())[0]


def test_tensorboard_without_the_package_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # as if it were not installed
    params = load_params("synthetic", tiny_overrides(tmp_path, "tensorboard=true"), use_env=False)
    with pytest.raises(TrainingSetupError, match=r'pip install "emcl-nb\[tensorboard\]"'):
        train(params)
    assert not params.out_dir.exists()
