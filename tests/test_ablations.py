"""The trained part of the ablation grid: which runs it trains, and the baseline table."""
from emcl_nb import ablations
from emcl_nb.params import Params


def fake_training(monkeypatch) -> list[Params]:
    """Record the runs `trained_ablations` asks for instead of training them."""
    loaded = []

    def load_run(variant):
        loaded.append(variant)
        return "model", variant, "features"

    metrics = {"t2v": {"R1": 1.0, "R5": 2.0, "MnR": 3.0}, "v2t": {"R1": 4.0}}
    monkeypatch.setattr(ablations, "_load_run", load_run)
    monkeypatch.setattr(ablations, "measure", lambda features, model, params, mode=None: (metrics, None))
    return loaded


def test_baselines_are_trained_at_the_ablation_budget_and_tabled_in_order(monkeypatch):
    loaded = fake_training(monkeypatch)
    rows = ablations.trained_ablations(Params(run="r", epochs=12, ablation_epochs=2,
                                              reference_selection=True))
    runs = {variant.run: variant for variant in loaded}
    assert all(variant.epochs == 2 and not variant.reference_selection for variant in loaded)
    assert (runs["r-meanp"].pooling, runs["r-meanp"].agg_module, runs["r-meanp"].emcl) == ("mean", "None", "off")
    assert (runs["r-emcl-off"].pooling, runs["r-emcl-off"].emcl) == ("text", "off")
    assert runs["r-reference"].emcl == "on"                  # EMCL-Net at the same budget
    table = ablations.baseline_table(rows).splitlines()[2:]
    assert [line.split(" | ")[1] for line in table] == list(ablations.BASELINES)
    assert table[0].startswith("| CLIP4Clip meanP") and "reference inference module" in table[1]


def test_emcl_net_is_the_main_run_when_the_budgets_agree(monkeypatch):
    loaded = fake_training(monkeypatch)
    ablations.trained_ablations(Params(run="r", epochs=5), variants={})
    assert [variant.run for variant in loaded] == ["r"]


def test_importing_the_ablations_does_not_import_matplotlib_or_widgets():
    """The EM analysis the ablations use is kept apart from its figures and the explorer."""
    import subprocess
    import sys

    code = ("import emcl_nb.ablations, sys; "
            "assert 'matplotlib' not in sys.modules and 'ipywidgets' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
