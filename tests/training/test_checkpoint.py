"""Checkpoint files: their tensors are checked against the checksum written with them."""
import pytest
import torch

from emcl_nb.training.checkpoint import CheckpointError, read_checkpoint, save_checkpoint


def _zero_middle(path, size=4096):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = bytes(size)
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_an_error_naming_the_file(make_model, tiny_params, tmp_path):
    """4 KiB zeroed in the middle of best.pt: evaluation scored the damaged weights (issue 24)."""
    path = tmp_path / "best.pt"
    save_checkpoint(path, model=make_model(), epoch=1, step=4, params=tiny_params.to_dict())
    assert torch.equal(read_checkpoint(path)["model"]["clip.logit_scale"],
                       make_model().state_dict()["clip.logit_scale"])      # an intact file reads
    _zero_middle(path)
    with pytest.raises(CheckpointError, match=f"{path} is damaged.*Use another checkpoint"):
        read_checkpoint(path)


def test_a_damaged_checkpoint_fails_its_evaluation(make_model, tiny_params, tmp_path):
    """The evaluation entry point refuses it too (it reads the file through read_checkpoint)."""
    from emcl_nb.evaluation.run import load_for_evaluation
    path = tmp_path / "best.pt"
    save_checkpoint(path, model=make_model(), epoch=1, step=4, params=tiny_params.to_dict())
    _zero_middle(path)
    with pytest.raises(CheckpointError, match="damaged"):
        load_for_evaluation(path, tiny_params, torch.device("cpu"))


def test_checkpoints_without_a_checksum_still_read(make_model, tiny_params, tmp_path):
    """Checkpoints of earlier versions carry no checksum: they read as before."""
    path = tmp_path / "old.pt"
    save_checkpoint(path, model=make_model(), epoch=1, step=4, params=tiny_params.to_dict())
    state = read_checkpoint(path)
    del state["checksum"]
    torch.save(state, path)
    assert read_checkpoint(path)["epoch"] == 1
