"""What the nbval run of the notebooks produced, checked with bounds that hold on any CPU.

`make test-notebooks` runs this file right after nbval has executed notebooks 01-06 with
the nbval configuration (run `nbval`); it is not collected by `pytest tests`. nbval
compares only the text around numbers, so the numbers are checked here: the model
learns, the reported metrics match an independent computation, the files are written.
"""
import json
import math
from pathlib import Path

import pytest

from emcl_nb.params import load_params

RUN_DIR = Path(__file__).resolve().parent.parent / "outputs" / "synthetic" / "nbval"
MAX_FIGURE_BYTES = 150_000


@pytest.fixture(scope="module")
def run_dir() -> Path:
    if not (RUN_DIR / "metrics.json").is_file():
        pytest.fail(f"{RUN_DIR} holds no nbval run: run `make test-notebooks`, which executes "
                    f"the notebooks before this file")
    return RUN_DIR


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["results"]


def test_the_loss_falls(run_dir):
    losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    batch = load_params("synthetic", [], use_env=True).batch_size
    assert start == pytest.approx(math.log(batch), rel=0.1)        # chance level at the start
    assert end < 0.5 * start, (start, end)


def test_retrieval_is_far_above_chance(run_dir):
    for key in ("best", "last"):
        result = _metrics(run_dir)[key]
        chance = result["chance_R1"]
        for direction in ("t2v", "v2t"):
            recall = result[direction]
            assert recall["R1"] >= 10 * chance, (key, direction, recall, chance)
            assert recall["R1"] <= recall["R5"] <= recall["R10"] <= 100.0
            assert recall["MdR"] >= 1.0 and recall["MnR"] >= 1.0


def test_reported_recall_matches_an_independent_ranking(run_dir):
    """Re-score the last checkpoint and rank with plain argsort: the R@K in metrics.json
    agree within one query (a tie could be counted either way)."""
    from emcl_nb.evaluation.run import load_split
    from emcl_nb.evaluation.scoring import score

    params = load_params("synthetic", ["run=nbval"], use_env=True)
    model, run_params, _, features = load_split(run_dir / "checkpoints" / "last.pt", params, "test")
    sim = score(features, run_params, model).double().numpy()                # [texts, videos]
    truth = features.text_video.numpy()
    order = (-sim).argsort(axis=1, kind="stable")                             # best video first
    ranks = 1 + (order == truth[:, None]).argmax(axis=1)                      # [texts]
    reported = _metrics(run_dir)["last"]["t2v"]
    for k in (1, 5, 10):
        recall = 100.0 * (ranks <= k).mean()
        assert recall == pytest.approx(reported[f"R{k}"], abs=100.0 / len(ranks) + 1e-6), k


def test_every_notebook_wrote_its_results(run_dir):
    rescored = json.loads((run_dir / "ablations.json").read_text())          # notebook 04
    assert rescored["questions"] and all(q["low"] <= q["diff"] <= q["high"] for q in rescored["questions"])
    assert all(0.0 <= arm["t2v_R1"]["mean"] <= 100.0 for arm in rescored["arms"].values())
    figures = sorted((run_dir / "figures").glob("*.*"))
    names = {path.stem for path in figures}
    assert {"01_sampled_frames", "02_training", "03_recall_at_k", "03_top5", "04_ablations",
            "em_responsibilities", "em_basis_loadings", "em_frame_weights", "em_modality_gap",
            "06_search_1"} <= names
    assert all(path.stat().st_size <= MAX_FIGURE_BYTES for path in figures), \
        {path.name: path.stat().st_size for path in figures}
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    indexed = json.loads((run_dir / "search-index" / "index.json").read_text())       # notebook 06
    assert len(indexed["videos"]) == _metrics(run_dir)["last"]["n_videos"] and not indexed["unreadable"]
