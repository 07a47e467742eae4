"""Parameter files: every dataset loads, overrides are typed, mistakes are named."""
import dataclasses
import inspect

import pytest

from emcl_nb import params as params_module
from emcl_nb.params import FIELDS, Params, ParamsError, available_datasets, load_params

DATASETS = ["synthetic", "msrvtt", "msvd", "lsmdc", "activity", "didemo"]


def test_every_dataset_has_a_parameter_file():
    assert set(DATASETS) <= set(available_datasets())


@pytest.mark.parametrize("dataset", DATASETS)
def test_parameter_file_loads(dataset):
    params = load_params(dataset, use_env=False)
    assert params.dataset == dataset
    assert params.out_dir.parts[-2:] == (dataset, "default")


def test_reference_hyperparameters_match_the_release():
    msrvtt, didemo = load_params("msrvtt", use_env=False), load_params("didemo", use_env=False)
    assert (msrvtt.epochs, msrvtt.lr, msrvtt.coef_lr, msrvtt.batch_size) == (5, 1e-4, 1e-3, 128)
    assert (msrvtt.max_frames, msrvtt.max_words, msrvtt.emcl_bases, msrvtt.emcl_stages) == (12, 32, 32, 9)
    assert (didemo.max_frames, didemo.max_words, didemo.epochs) == (64, 64, 5)   # the code's command
    assert msrvtt.published["code release, 8 V100"]["t2v"]["R1"] == 48.2


@pytest.mark.parametrize("dataset", DATASETS[1:])
def test_real_datasets_train_with_the_reference_recipe(dataset):
    params = load_params(dataset, use_env=False)
    assert (params.optimizer, params.pooling, params.warmup_proportion, params.grad_clip) == (
        "bertadam", "text", 0.1, 1.0)
    assert params.msrvtt_val_csv == ""          # MSR-VTT trains on all 9,000 train.9k videos


def test_optimizer_and_pooling_are_flat_keys():
    params = load_params("msvd", {"optimizer": "adamw", "pooling": "mean", "clip_dtype": "fp32"}, use_env=False)
    assert (params.optimizer, params.pooling) == ("adamw", "mean")
    with pytest.raises(ParamsError, match="clip_dtype=fp16 .* optimizer=bertadam, or clip_dtype=fp32"):
        load_params("msvd", {"optimizer": "adamw"}, use_env=False)      # the file's fp16 CLIP needs BertAdam
    with pytest.raises(ParamsError, match="pooling"):
        load_params("msvd", {"pooling": "max"}, use_env=False)


def test_overrides_are_converted_to_the_declared_type():
    params = load_params("synthetic", ["epochs=3", "lr=2e-3", "train_augment=true"], use_env=False)
    assert (params.epochs, params.lr, params.train_augment) == (3, 2e-3, True)
    assert load_params("synthetic", {"batch_size": 8}, use_env=False).batch_size == 8
    assert load_params("synthetic", "epochs=2 seed=4", use_env=False).seed == 4


def test_unknown_key_names_the_key_and_lists_valid_ones():
    with pytest.raises(ParamsError) as error:
        load_params("synthetic", ["epoch=3"], use_env=False)
    assert "'epoch'" in str(error.value) and "epochs" in str(error.value)
    assert all(name in str(error.value) for name in FIELDS)


def test_wrong_type_and_wrong_choice_are_errors():
    with pytest.raises(ParamsError, match="'epochs'.*must be int"):
        load_params("synthetic", ["epochs=many"], use_env=False)
    with pytest.raises(ParamsError, match="agg_module.*seqTransf"):
        load_params("synthetic", ["agg_module=gru"], use_env=False)


@pytest.mark.parametrize("setting, rule", [
    ("lr=-1", "lr.*at least 0"), ("grad_clip=-1", "grad_clip.*at least 0"), ("coef_lr=-1", "coef_lr"),
    ("warmup_proportion=5", r"warmup_proportion.*\[0, 1\)"), ("warmup_proportion=1", r"\[0, 1\)"),
    ("max_frames=0", "max_frames.*at least 1"), ("run=../../x", "run.*single folder name"),
    ("run=a/b", "single folder name"), ("run=..", "single folder name"), ("run=", "single folder name"),
])
def test_settings_that_cannot_be_meant_are_refused(setting, rule):
    with pytest.raises(ParamsError, match=rule):
        load_params("synthetic", [setting], use_env=False)


def test_limits_apply_to_replace_too():
    params = load_params("synthetic", use_env=False)
    with pytest.raises(ParamsError, match="max_frames"):
        params.replace(max_frames=0)
    assert params.replace(lr=0.0, warmup_proportion=0.0, grad_clip=0.0, run="run-2.b").run == "run-2.b"


def test_unknown_dataset_lists_the_files_that_exist():
    with pytest.raises(ParamsError) as error:
        load_params("kinetics", use_env=False)
    assert "kinetics" in str(error.value)
    assert all(name in str(error.value) for name in DATASETS)


def test_environment_overrides_apply_last(monkeypatch):
    monkeypatch.setenv("EMCL_NB_OVERRIDES", "epochs=1 run=ci")
    params = load_params("synthetic", ["epochs=3"])
    assert (params.epochs, params.run) == (1, "ci")


def test_relative_paths_are_relative_to_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params("synthetic", use_env=False)
    assert params.anno_path.endswith("outputs/data/synthetic") and params.anno_path.startswith("/")
    assert str(tmp_path) not in params.anno_path


# The field groups as they were listed by hand before they were derived from the tags, with
# the fields added since (the reference regime: temporal_ln_eps, ddp_gradients, clip_dtype;
# a short trial: max_train_videos, max_steps, max_eval_videos).
OLD_DATA = ("layout", "max_words", "max_frames", "video_framerate", "image_size")
OLD_MODEL = ("clip_weights", "tiny_width", "tiny_layers", "tiny_patch", "image_size",
             "agg_module", "num_hidden_layers", "pooling", "temp", "emcl", "emcl_bases", "emcl_stages",
             "emcl_momentum", "emcl_lamd", "emcl_beta", "emcl_init", "temporal_ln_eps")
OLD_TRAINING = ("seed", "msrvtt_train_csv", "msrvtt_val_csv", "train_augment", "augment_on", "epochs",
                "batch_size", "optimizer", "lr", "coef_lr", "weight_decay", "decay_exempt",
                "warmup_proportion", "grad_clip", "freeze_patch_embedding", "precision",
                "ddp_gradients", "clip_dtype", "max_train_videos", "max_steps")
OLD_SYNTHETIC = ("synthetic", "synthetic_distractors", "synthetic_shape_scale", "synthetic_templates",
                 "synthetic_seed", "synthetic_train", "synthetic_test", "synthetic_val",
                 "synthetic_frames", "synthetic_fps", "synthetic_size")
OLD_SELECTION = ("reference_selection", "reference_eval_steps", "max_eval_videos")
OLD_GROUPS = {
    "PATH_FIELDS": ("anno_path", "video_path", "output_root", "frame_cache_dir"),
    "DATA_FIELDS": OLD_DATA,
    "FEATURE_FIELDS": OLD_DATA + ("on_bad_sample",),
    "MODEL_FIELDS": OLD_MODEL,
    "TRAINING_FIELDS": OLD_TRAINING,
    "SYNTHETIC_FIELDS": OLD_SYNTHETIC,
    "SELECTION_FIELDS": OLD_SELECTION,
    "RESUME_FIELDS": OLD_MODEL + OLD_DATA + OLD_TRAINING + OLD_SYNTHETIC + OLD_SELECTION,
    "REUSE_FIELDS": tuple(n for n in OLD_TRAINING if n not in ("seed", "precision", "clip_dtype")) + OLD_SYNTHETIC,
    "SCORING_FIELDS": ("block_size", "emcl_bases", "emcl_stages", "emcl_lamd", "emcl_beta", "emcl_init",
                       "inference_emcl_bases", "inference_emcl_stages", "inference_emcl_lamd",
                       "inference_emcl_beta", "inference_block_size", "dsl_t2v_temp", "dsl_v2t_temp"),
}


@pytest.mark.parametrize("name", OLD_GROUPS)
def test_derived_field_groups_are_the_groups_once_listed_by_hand(name):
    group = getattr(params_module, name)
    assert len(group) == len(set(group)), f"{name} lists a field twice"
    assert set(group) == set(OLD_GROUPS[name])


def test_emcl_settings_map_the_scoring_fields_to_emcl_attributes():
    assert params_module.EMCL_SETTINGS == {"emcl_bases": "num_bases", "emcl_stages": "stage_num",
                                           "emcl_lamd": "lamd", "emcl_beta": "beta", "emcl_init": "init"}


def test_every_field_has_a_section_and_the_model_config_is_the_model_fields():
    from emcl_nb.model.config import ModelConfig

    sections = {f.name: f.metadata.get("section") for f in dataclasses.fields(Params)}
    assert set(sections.values()) == set(params_module.SECTIONS)
    config_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert config_fields == set(params_module.MODEL_FIELDS) | {"seed"}


def test_synthetic_defaults_are_stated_once():
    from emcl_nb.data import synthetic

    defaults = {name: parameter.default
                for name, parameter in inspect.signature(synthetic.generate_synthetic).parameters.items()
                if name not in ("out_dir", "workers", "progress")}
    assert defaults == params_module.synthetic_settings() == {
        name.removeprefix("synthetic_"): value for name, value in Params().to_dict().items()
        if name.startswith("synthetic_")}
    assert params_module.synthetic_settings(Params(synthetic_train=7))["train"] == 7


# Issue 24: a parameter given twice, a broken or unsafe YAML file, values with spaces and
# values that cannot work are named at load.

def test_a_key_given_twice_in_a_yaml_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("epochs: 2\nlr: 1.0e-4\nepochs: 3\n")
    with pytest.raises(ParamsError, match=r"twice.yaml, line 3.*'epochs' appears twice"):
        load_params(str(path), use_env=False)


@pytest.mark.parametrize("text, line", [("epochs: 2\nlr: [1e-4\n", 3),
                                        ("epochs: !!python/object/apply:os.system ['touch pwned']\n", 1)])
def test_a_broken_or_unsafe_yaml_file_names_the_file_and_line_and_runs_nothing(tmp_path, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=rf"bad.yaml, line {line}"):
        load_params(str(path), use_env=False)
    assert not (tmp_path / "pwned").exists()


def test_a_key_set_twice_is_an_error_in_every_kind_of_override(monkeypatch):
    with pytest.raises(ParamsError, match="'epochs' is set twice"):
        load_params("synthetic", ["epochs=1", "lr=0.1", "epochs=2"], use_env=False)
    with pytest.raises(ParamsError, match="'epochs' is set twice"):
        load_params("synthetic", "epochs=1 epochs=2", use_env=False)       # a notebook's overrides
    monkeypatch.setenv("EMCL_NB_OVERRIDES", "run=a run=b")
    with pytest.raises(ParamsError, match="'run' is set twice in EMCL_NB_OVERRIDES"):
        load_params("synthetic")


def test_quoted_override_values_keep_their_spaces(monkeypatch):
    params = load_params("synthetic", 'video_path="/my videos" epochs=1', use_env=False)
    assert (params.video_path, params.epochs) == ("/my videos", 1)
    monkeypatch.setenv("EMCL_NB_OVERRIDES", "anno_path='/my annotations'")
    assert load_params("synthetic").anno_path == "/my annotations"


def test_set_groups_on_the_command_line_join_and_a_repeat_is_refused(tmp_path, capsys):
    from emcl_nb import evaluate
    with pytest.raises(SystemExit):
        evaluate.main(["--set", "epochs=1", "--set", f"output_root={tmp_path}", "epochs=2"])
    assert "'epochs' is set twice" in capsys.readouterr().err


@pytest.mark.parametrize("setting, rule", [
    ("batch_size=0", "batch_size.*at least 1"), ("batch_size_val=0", "batch_size_val.*at least 1"),
    ("num_workers=-1", "num_workers.*at least 0"), ("log_every=0", "log_every.*at least 1"),
    ("epochs=0", "epochs.*at least 1"),
])
def test_counts_that_cannot_work_are_refused_at_load(setting, rule):
    with pytest.raises(ParamsError, match=rule):
        load_params("synthetic", [setting], use_env=False)


def test_an_output_root_that_is_a_file_is_refused_at_load(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ParamsError, match="output_root=.*is a file"):
        load_params("synthetic", [f"output_root={tmp_path / 'file'}"], use_env=False)
