"""Progress bars in a notebook are plain text updated in place, so a saved notebook
reopens with the bar's last line instead of "Error displaying widget: model not found";
in a terminal they are tqdm's, and a headless run's log gets none."""
import sys

import nbformat
from nbclient import NotebookClient

from emcl_nb.progress import in_kernel, progress_bar


def test_in_a_terminal_it_is_tqdm_on_stderr(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not in_kernel()
    assert list(progress_bar(range(3), desc="plain")) == [0, 1, 2]
    assert "plain: 100%" in capsys.readouterr().err


def test_a_log_that_is_not_a_terminal_gets_no_bar(capsys):
    assert not sys.stderr.isatty()                      # captured: as a log file would be
    assert list(progress_bar(range(3), desc="plain")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_in_a_kernel_the_bar_is_one_text_output_updated_in_place():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from emcl_nb.progress import progress_bar\n"
        "for _ in progress_bar(range(5), desc='kept', leave=True): pass\n"
        "for _ in progress_bar(range(5), desc='cleared', leave=False): pass")])
    NotebookClient(notebook, kernel_name="python3", timeout=120).execute()
    outputs = notebook.cells[0].outputs
    assert all(output.output_type == "display_data" for output in outputs)
    assert [set(output.data) for output in outputs] == [{"text/plain"}, {"text/plain"}]
    kept, cleared = (output.data["text/plain"] for output in outputs)
    assert kept.startswith("kept: 100%") and "5/5" in kept and "\r" not in kept
    assert cleared == ""
