"""The ablation grid: which runs it trains and scores, what it reuses, how it summarises."""
import json

import pytest
import torch

from emcl_nb.analysis import ablations
from emcl_nb.analysis.readme import markers, update_readme
from emcl_nb.params import Params
from emcl_nb.training.checks import TrainingSetupError


def test_variants_the_recipe_already_has_are_the_reference_run():
    base = Params(emcl_bases=8, emcl_beta=3.0)
    names = list(ablations.trained_variants(base))
    assert names[0] == ablations.REFERENCE
    assert "bases-8" not in names and "beta-1" in names and "meanp" in names


def test_arms_score_inference_only_emcl_on_the_runs_trained_without_it():
    arms = ablations.grid_arms(Params())
    assert arms["emcl-off+inference"][1:3] == ("emcl-off", "inference")
    assert arms["meanp+inference"][1:3] == ("meanp", "inference")
    assert not any(arm.startswith(("distinct+", "reference+")) for arm in arms)
    rescored = {arm for arm, (_, run, mode, _) in arms.items() if mode == "on"}
    assert all(arms[arm][1] == ablations.REFERENCE for arm in rescored)
    assert "reference@emcl_bases=32" not in arms and "reference@emcl_bases=8" in arms   # 32 is trained


def fake_scores(hits_of_run):
    """run_scores stand-in: every setting of a run gets the run's per-query hits."""
    def run_scores(params, settings):
        hits = hits_of_run(params)
        metrics = {"R1": 100.0 * sum(hits) / len(hits), "R5": 100.0, "MnR": 1.0}
        return {"train_seconds": 60.0, "scores": {key: {"t2v": metrics, "v2t": metrics, "hits": hits, "rank": 2}
                                                  for key in settings}}
    return run_scores


def test_grid_pairs_each_variant_with_its_baseline_on_the_same_seed(monkeypatch, tmp_path):
    """EMCL-Net wins every query on seed 0 and 1 against EMCL off, which wins none: +100
    points, significant; a variant scoring like EMCL-Net is 0, not significant."""
    trained = []

    def hits(params):
        trained.append((params.run, params.seed))
        return [0.0] * 20 if params.emcl == "off" else [1.0] * 20

    monkeypatch.setattr(ablations, "run_scores", fake_scores(hits))
    results = ablations.run_grid("synthetic", (0, 1), run="g", results_path=tmp_path / "grid.json")
    assert ("g-seed1-emcl-off", 1) in trained and ("g-seed0-reference", 0) in trained
    assert len(trained) == 2 * len(ablations.trained_variants(Params()))
    by_question = {q["question"]: q for q in results["questions"]}
    emcl = by_question["EMCL vs EMCL off"]
    assert emcl["diff"] == pytest.approx(100.0) and emcl["significant"] and emcl["per_seed"] == [100.0, 100.0]
    assert by_question["K = 8 vs EMCL-Net"]["verdict"] == "not significant"
    assert results["arms"]["reference"]["t2v_R1"]["values"] == [100.0, 100.0]
    assert results["timing"]["train_seconds"] == pytest.approx(60.0 * len(trained))
    assert json.loads((tmp_path / "grid.json").read_text())["questions"] == results["questions"]
    assert ablations.arms_table(results).splitlines()[2].endswith("| 100.0, 100.0 | 2, 2 |")
    markdown = ablations.readme_markdown(results)
    assert "Significant on this task: EMCL vs EMCL off" in markdown and "no significant effect" in markdown
    assert "more seeds are needed" not in markdown          # every seed agrees
    readme = tmp_path / "README.md"
    (demo_begin, demo_end), (begin, end) = markers("demo-results"), markers("ablations")
    demo_section = f"{demo_begin}\ndemo\n{demo_end}"
    readme.write_text(f"{demo_section}\n{begin}\nold\n{end}\n")
    update_readme("ablations", markdown, readme)
    assert readme.read_text() == f"{demo_section}\n{begin}\n{markdown}\n{end}\n"


def save_fake_checkpoint(params: Params, epoch: int):
    path = params.out_dir / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save({"params": params.to_dict(), "epoch": epoch}, path)
    return path


def test_a_complete_run_is_reused_an_unfinished_one_resumed_another_recipe_refused(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(ablations, "train", lambda params: calls.append(params.run))
    done = Params(output_root=str(tmp_path), run="done", epochs=3)
    save_fake_checkpoint(done, epoch=3)
    assert ablations.ensure_complete(done)[1] is None and calls == []
    half = done.replace(run="half")
    save_fake_checkpoint(half, epoch=1)
    assert ablations.ensure_complete(half)[1] is not None and calls == ["half"]
    with pytest.raises(TrainingSetupError, match="seed: 0 -> 1"):
        ablations.ensure_complete(done.replace(seed=1))


def test_scores_are_cached_per_checkpoint(monkeypatch, tmp_path):
    params = Params(output_root=str(tmp_path), run="r", epochs=1)
    last = save_fake_checkpoint(params, epoch=1)
    scored = []

    def score_checkpoint(path, params, settings):
        scored.extend(settings)
        return {key: {"hits": [1.0]} for key in settings}

    monkeypatch.setattr(ablations, "score_checkpoint", score_checkpoint)
    off = {"off": ("off", {})}
    trained_seconds = iter([12.0, None, None, None])       # trained by the first call only
    monkeypatch.setattr(ablations, "ensure_complete", lambda params: (last, next(trained_seconds)))
    ablations.run_scores(params, off)
    ablations.run_scores(params, {**off, "trained": (None, {})})
    assert scored == ["off", "trained"]                     # only the new setting is scored
    rescored = params.replace(block_size=8)                 # another scoring: scored again,
    assert ablations.run_scores(rescored, off)["train_seconds"] == 12.0   # the training time kept
    assert scored == ["off", "trained", "off"]
    torch.save({"params": params.to_dict(), "epoch": 1, "changed": True}, last)   # retrained
    assert ablations.run_scores(params, off)["scores"] == {"off": {"hits": [1.0]}}
    assert scored == ["off", "trained", "off", "off"]


def test_importing_the_ablations_does_not_import_matplotlib_or_widgets():
    """The EM analysis the ablations use is kept apart from its figures and the explorer."""
    import subprocess
    import sys

    code = ("import emcl_nb.analysis.ablations, sys; "
            "assert 'matplotlib' not in sys.modules and 'ipywidgets' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_one_seed_tables_show_no_seed_spread():
    """The demo's re-scoring (one seed) shows means and intervals, not a "± 0.0" spread."""
    question = {"question": "EMCL vs off", "diff": 1.5, "std": 0.0, "low": -1.0, "high": 4.0,
                "verdict": "not significant"}
    one = {"seeds": [0], "bootstrap": {"confidence": 0.95}, "questions": [question]}
    three = {**one, "seeds": [0, 1, 2], "questions": [{**question, "std": 0.7}]}
    assert "| EMCL vs off | +1.5 | -1.0 to +4.0 | not significant |" in ablations.questions_table(one)
    assert "one seed" in ablations.questions_table(one)
    assert "| EMCL vs off | +1.5 ± 0.7 | -1.0 to +4.0 | not significant |" in ablations.questions_table(three)
