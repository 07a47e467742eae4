"""The notebooks as papermill sees them: typed parameters, bad parameters fail the run, and
they run from the repository root and from inside notebooks/. (nbval runs them all in
`make test`; this file checks what nbval cannot.)"""
import json
from pathlib import Path

import papermill
import pytest

from emcl_nb.analysis import demo
from emcl_nb.analysis.readme import markers, update_readme
from emcl_nb.demo import demo_overrides
from emcl_nb.params import Params, parse_overrides

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
TINY = ("synthetic_train=8 synthetic_val=2 synthetic_test=4 synthetic_frames=6 synthetic_size=32 "
        "image_size=32 run=papermill-test progress=false "
        "anno_path=outputs/data/papermill-test video_path=outputs/data/papermill-test/videos")


def test_the_six_numbered_notebooks_exist():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_", "06_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_are_typed_and_dataset_comes_first(path):
    parameters = papermill.inspect_notebook(str(path))
    names = list(parameters)
    assert names[:3] == ["dataset", "run", "overrides"]
    assert parameters["dataset"]["default"] == '"synthetic"'
    assert parameters["run"]["default"] == f'"{Params().run}"'    # the command line's default run
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


def test_a_parameter_the_notebook_does_not_declare_fails_the_run(tmp_path):
    """papermill itself only warns ("Passed unknown parameter") and runs the defaults."""
    with pytest.raises(papermill.PapermillExecutionError) as error:
        _run(tmp_path, ROOT, epochs=1)
    assert "unknown notebook parameter(s): epochs" in str(error.value)
    assert 'overrides "epochs=1"' in str(error.value)


@pytest.mark.parametrize("name", ["03_evaluate", "05_em_attention", "06_search"])
def test_a_notebook_that_evaluates_stops_on_an_untrained_run_and_trains_nothing(tmp_path, name, monkeypatch):
    monkeypatch.delenv("EMCL_NB_OVERRIDES", raising=False)
    with pytest.raises(papermill.PapermillExecutionError) as error:
        papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"run": "never-trained", "overrides": f"output_root={tmp_path}"},
                                   cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    assert "has no checkpoint" in str(error.value) and "evaluation does not train" in str(error.value)
    assert not (tmp_path / "synthetic" / "never-trained" / "checkpoints").exists()


def test_unknown_parameters_are_found_in_the_kernel_history():
    from emcl_nb.notebook import unknown_parameters

    history = ["", "import x", 'dataset: str = "synthetic"\nrun: str = "demo"  # comment',
               '# Parameters\ndataset = "msvd"\nepochs = 1\n', "P = 1"]
    assert unknown_parameters(history) == (["epochs"], ["dataset", "run"])
    assert unknown_parameters(history[:3]) == ([], [])          # no papermill: nothing to check


# ---- the committed notebooks are the demo's documents ----------------------------------

def _outputs(path: Path) -> list[dict]:
    return [output for cell in json.loads(path.read_text())["cells"] for output in cell.get("outputs", [])]


def _text(output: dict) -> str:
    text = output.get("text", "")
    data = output.get("data", {})
    return "".join(text) + "".join("".join(data.get(kind, "")) for kind in ("text/plain", "text/markdown", "text/html"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_open_unmodified_and_show_no_test_configuration(path):
    notebook = json.loads(path.read_text())
    assert notebook["metadata"]["kernelspec"] == demo.KERNELSPEC      # what JupyterLab writes on open
    assert "papermill" not in notebook["metadata"]
    assert not any("injected-parameters" in cell.get("metadata", {}).get("tags", [])
                   for cell in notebook["cells"])
    for output in _outputs(path):
        assert "application/vnd.jupyter.widget-view+json" not in output.get("data", {})
        text = _text(output)
        for leak in ("EMCL_NB_OVERRIDES", "nbval", str(ROOT), "/root/", "/home/", "MISSING"):
            assert leak not in text, (leak, text[:300])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_figures_are_sized_for_reading(path):
    import base64
    sizes = [len(base64.b64decode("".join(output["data"][kind])))
             for output in _outputs(path) for kind in ("image/png", "image/jpeg")
             if kind in output.get("data", {})]
    assert all(size <= 150_000 for size in sizes), sizes
    assert path.stat().st_size <= 2_000_000


def test_committed_evaluation_shows_the_demo_result():
    lines = [line for output in _outputs(ROOT / "notebooks" / "03_evaluate.ipynb")
             for line in _text(output).splitlines() if line.startswith("best: text->video R@1")]
    assert len(lines) == 1
    assert float(lines[0].split("R@1 ")[1].split(",")[0]) >= 80.0


def test_clean_notebook_drops_what_papermill_adds():
    executed = {"metadata": {"kernelspec": {"display_name": "Python 3", "name": "python3"},
                             "papermill": {"duration": 1.0}},
                "cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "outputs": []},
                          {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "outputs": []},
                          {"cell_type": "code", "metadata": {"papermill": {}, "execution": {}},
                           "outputs": [{"output_type": "stream", "text": "ok"}]}],
                "nbformat": 4, "nbformat_minor": 5}
    cleaned = demo.clean_notebook(executed)
    assert [cell["metadata"] for cell in cleaned["cells"]] == [{"tags": ["parameters"]}, {}]
    assert cleaned["metadata"] == {"kernelspec": demo.KERNELSPEC}
    widget = {"output_type": "display_data", "data": {"application/vnd.jupyter.widget-view+json": {}}}
    executed["cells"][2]["outputs"].append(widget)
    with pytest.raises(ValueError, match="widget"):
        demo.clean_notebook(executed)


def test_results_section_is_written_from_the_run_files(tmp_path):
    def result(r1, epoch):
        recall = {"R1": r1, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.1}
        return {"t2v": recall, "v2t": {**recall, "R1": r1 - 2}, "n_texts": 100, "n_videos": 100,
                "chance_R1": 1.0, "epoch": epoch}
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(
        {"results": {"best": result(86.0, 9), "last": result(91.0, 12)}}))
    study = {"seeds": {0: {"best": result(86.0, 9), "last": result(91.0, 12)},
                       1: {"best": result(80.0, 8), "last": result(85.0, 12)},
                       2: {"best": result(83.0, 7), "last": result(88.0, 12)}}}
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "reference.pt").write_bytes(b"")
    (run_dir / "reference.json").write_text(json.dumps({"split": "test", "every": 30, "best": {"step": 990}}))
    reference = {**result(92.0, None), "epoch": 11}
    (run_dir / "metrics.json").write_text(json.dumps(
        {"results": {"best": result(86.0, 9), "last": result(91.0, 12), "reference_protocol": reference}}))
    section = demo.results_markdown(run_dir, study, {"01_data_prep": 20.0, "02_train": 220.0})
    assert "| reference protocol (selected on test every 30 steps: step 990) | 92 | 100 | 90 |  |  |" in section
    assert "| best on validation (epoch 9) | 86 | 100 | 84 | 83 ± 3 (86, 80, 83) | 81 ± 3 (84, 78, 81) |" in section
    assert "| last epoch (epoch 12) | 91 | 100 | 89 | 88 ± 3 (91, 85, 88) | 86 ± 3 (89, 83, 86) |" in section
    assert "01: 20 s, 02: 220 s" in section
    readme = tmp_path / "README.md"
    begin, end = markers("demo-results")
    readme.write_text(f"# x\n{begin}\nold\n{end}\nrest\n")
    update_readme("demo-results", section, readme)
    assert readme.read_text() == f"# x\n{begin}\n{section}\n{end}\nrest\n"


def test_demo_overrides_turn_progress_off_unless_set_and_keep_values_with_spaces():
    assert parse_overrides(demo_overrides(["epochs=1"])) == {"progress": "false", "epochs": "1"}
    assert parse_overrides(demo_overrides(["progress=true"])) == {"progress": "true"}
    assert parse_overrides(demo_overrides(["video_path=/my videos"])) == {
        "progress": "false", "video_path": "/my videos"}
