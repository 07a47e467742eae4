"""The notebooks as papermill sees them: typed parameters, bad parameters fail the run, and
they run from the repository root and from inside notebooks/. (nbval runs them all in
`make test`; this file checks what nbval cannot.)"""
import json
from pathlib import Path

import papermill
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
TINY = ("synthetic_train=8 synthetic_val=2 synthetic_test=4 synthetic_frames=6 synthetic_size=32 "
        "image_size=32 run=papermill-test progress=false "
        "anno_path=outputs/data/papermill-test video_path=outputs/data/papermill-test/videos")


def test_the_five_numbered_notebooks_exist():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_are_typed_and_dataset_comes_first(path):
    parameters = papermill.inspect_notebook(str(path))
    names = list(parameters)
    assert names[:3] == ["dataset", "run", "overrides"]
    assert parameters["dataset"]["default"] == '"synthetic"'
    assert all(p["inferred_type_name"] not in ("None", "") for p in parameters.values()), parameters


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_keep_logic_in_the_package(path):
    code = "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"]
                     if cell["cell_type"] == "code")
    for forbidden in ("torch.optim", "nn.Module", ".backward(", "softmax("):
        assert forbidden not in code, f"{path.name} holds model or training logic ({forbidden})"


def _run(tmp_path, cwd, **parameters):
    return papermill.execute_notebook(str(ROOT / "notebooks" / "01_data_prep.ipynb"),
                                      str(tmp_path / "out.ipynb"), parameters=parameters,
                                      cwd=str(cwd), progress_bar=False, kernel_name="python3")


def test_unknown_dataset_fails_the_run_and_lists_the_files(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as error:
        _run(tmp_path, ROOT, dataset="kinetics")
    assert "unknown dataset 'kinetics'" in str(error.value) and "msvd" in str(error.value)


def test_unknown_parameter_fails_the_run_and_names_it(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as error:
        _run(tmp_path, ROOT, overrides="epoch=3")
    assert "unknown parameter 'epoch'" in str(error.value) and "epochs" in str(error.value)


@pytest.mark.parametrize("where", ["root", "notebooks"])
def test_data_prep_runs_from_the_root_and_from_notebooks(tmp_path, where, monkeypatch):
    monkeypatch.delenv("EMCL_NB_OVERRIDES", raising=False)
    cwd = ROOT if where == "root" else ROOT / "notebooks"
    result = _run(tmp_path, cwd, overrides=TINY, num_videos_shown=2)
    outputs = "".join(o.get("text", "") for c in result["cells"] for o in c.get("outputs", []))
    assert "annotations in outputs/data/papermill-test" in outputs
    assert (ROOT / "outputs/synthetic/papermill-test/figures/01_sampled_frames.png").is_file()
