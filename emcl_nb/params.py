"""One flat, typed block of run parameters, loaded from `params/<dataset>.yaml`.

The same `Params` drives the notebooks, the command-line tools and `torchrun`:
`load_params("msvd", {"epochs": 2})` or `load_params("msvd", ["epochs=2"])`.
Unknown keys and wrong types are errors that name the key and list the valid ones.
Over 300 lines: every field, its section and roles, and its checks live in this one place.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from emcl_nb.io import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = Path(os.environ.get("EMCL_NB_PARAMS_DIR", REPO_ROOT / "params"))
# Extra `key=value` overrides applied last (split as a shell would: quote a value with
# spaces, video_path="/my videos"). CI uses it to shrink the
# notebook runs that nbval checks; it is printed whenever it is used.
ENV_OVERRIDES = "EMCL_NB_OVERRIDES"


def repo_relative(path) -> str:
    """`path` relative to the repository root: output that reads the same on every machine."""
    return os.path.relpath(path, REPO_ROOT)


class ParamsError(ValueError):
    """A parameter file or override that cannot be used; the message says how to fix it."""


# Roles a field plays in the checks (its `roles` metadata); the field groups below are
# derived from them and from the sections, never listed by hand.
DATA = "data"                  # what a video or caption becomes as model input
FEATURE = "feature"            # changes the encoded features besides the data fields
MODEL = "model"                # defines the trained model (ModelConfig, which also holds the seed)
TRAINING = "training"          # sets the data order or the optimisation
SELECTION = "selection"        # what the reference's step-wise selection records
SCORING = "scoring"            # changes only the scoring of encoded features
PATH = "path"                  # a path taken from the repository root when relative
EVAL_MAY_CHANGE = "eval may change"   # a training setting evaluation of a finished run may change
SECTIONS = ("run", "data", "synthetic", "model", "train", "eval")


def _field(section: str, default, *roles: str, emcl_attr: str | None = None):
    """A Params field with its section and roles (dataclass metadata); `emcl_attr`: the EMCL
    attribute it sets, for re-scoring a trained model with other EMCL settings."""
    metadata = {"section": section, "roles": frozenset(roles), "emcl_attr": emcl_attr}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


def in_run(default, *roles):
    return _field("run", default, *roles)


def in_data(default, *roles):
    return _field("data", default, *roles)


def in_synthetic(default, *roles):
    return _field("synthetic", default, *roles)


def in_model(default, *roles, emcl_attr=None):
    return _field("model", default, *roles, emcl_attr=emcl_attr)


def in_train(default, *roles):
    return _field("train", default, *roles)


def in_eval(default, *roles):
    return _field("eval", default, *roles)


@dataclass
class Params:
    # ---- run ----
    dataset: str = in_run("synthetic")              # name of the parameter file in params/
    run: str = in_run("default")                    # outputs go to <output_root>/<dataset>/<run>/
    output_root: str = in_run("outputs", PATH)
    seed: int = in_run(0, TRAINING, EVAL_MAY_CHANGE)
    device: str = in_run("auto")                    # auto | cpu | cuda
    num_threads: int = in_run(0)                    # torch CPU threads; 0 = torch's default
    deterministic: bool = in_run(True)              # torch.use_deterministic_algorithms where supported

    # ---- data ----
    # annotation layout: msrvtt | msvd | lsmdc | activity | didemo
    layout: str = in_data("msrvtt", DATA)
    anno_path: str = in_data("", PATH)              # folder with the annotation files
    video_path: str = in_data("", PATH)             # folder with the (compressed) videos
    msrvtt_train_csv: str = in_data("MSRVTT_train.9k.csv", TRAINING)
    # validation ids held out of training (e.g. MSRVTT_val.full.csv); "" = none
    msrvtt_val_csv: str = in_data("", TRAINING)
    # a short trial on real data: the first N videos of the training split (with all their
    # captions), of the validation and test splits; 0 = all
    max_train_videos: int = in_data(0, TRAINING)
    max_eval_videos: int = in_data(0, SELECTION)
    max_words: int = in_data(32, DATA)
    max_frames: int = in_data(12, DATA)
    video_framerate: int = in_data(1, DATA)         # frames sampled per second of video
    image_size: int = in_data(224, DATA, MODEL)     # frame side fed to CLIP
    # timm rand-m7-n4-mstd0.5-inc1 on training clips (one policy per clip)
    train_augment: bool = in_data(True, TRAINING)
    # where that augmentation runs: loader (PIL in the loader workers, the reference's) |
    # device (batched on the training device, emcl_nb.data.device_augment)
    augment_on: str = in_data("loader", TRAINING)
    num_workers: int = in_data(4)
    # keep decoded clips in memory in each loader worker (small sets)
    cache_decoded_clips: bool = in_data(False)
    # read sampled frames from the on-disk decoded-frame cache (built by ensure_data or
    # `python -m emcl_nb.data.frame_cache`)
    frame_cache: bool = in_data(False)
    # where frame caches go; "" = <output_root>/frame_cache/<dataset>
    frame_cache_dir: str = in_data("", PATH)
    # skip | raise: what to do with a missing/corrupt video or empty caption
    on_bad_sample: str = in_data("skip", FEATURE)

    # ---- synthetic dataset (layout msrvtt, generated by emcl_nb.data.synthetic) ----
    # anno_path holds a generated synthetic set, made on first use
    synthetic: bool = in_synthetic(False)
    # extra moving shapes not named by the captions (harder task)
    synthetic_distractors: int = in_synthetic(0)
    synthetic_shape_scale: float = in_synthetic(1.0)  # shape size factor (radius 10-14 % of the side x this)
    synthetic_templates: int = in_synthetic(3)      # caption paraphrases per video, 1-7 (more is harder)
    # draws the synthetic videos (independent of the training seed)
    synthetic_seed: int = in_synthetic(0)
    synthetic_train: int = in_synthetic(500)        # training videos
    synthetic_test: int = in_synthetic(100)         # test videos (one caption each)
    synthetic_val: int = in_synthetic(50)           # held-out validation videos (msrvtt_val_csv)
    synthetic_frames: int = in_synthetic(24)        # frames per generated video (at synthetic_fps)
    synthetic_fps: int = in_synthetic(3)            # frames per second of the generated videos
    synthetic_size: int = in_synthetic(64)          # generated frame side, pixels (even)

    # ---- model (ModelConfig) ----
    # ViT-B/32 | ViT-B/16 | ViT-L/14 | tiny | path/to/weights.pt
    clip_weights: str = in_model("ViT-B/32", MODEL)
    clip_cache: str = in_model("~/.cache/clip")     # folder where named CLIP weights are looked up
    tiny_width: int = in_model(128, MODEL)          # tiny CLIP: transformer width (= embedding dim)
    tiny_layers: int = in_model(2, MODEL)           # tiny CLIP: layers of each tower
    tiny_patch: int = in_model(16, MODEL)           # tiny CLIP: ViT patch size
    agg_module: str = in_model("seqTransf", MODEL)  # None | seqLSTM | seqTransf
    num_hidden_layers: int = in_model(4, MODEL)     # temporal transformer depth
    # eps of the temporal transformer's LayerNorms: 1e-12 in the reference (its TF-style
    # LayerNorm), 1e-5 in CLIP's blocks (ours)
    temporal_ln_eps: float = in_model(1e-5, MODEL)
    # text (text-conditioned frame weights) | mean (CLIP4Clip meanP)
    pooling: str = in_model("text", MODEL)
    temp: float = in_model(3.0, MODEL)              # text-conditioned pooling temperature
    # on (train + eval) | off (no EMCL) | inference (eval only)
    emcl: str = in_model("on", MODEL)
    emcl_bases: int = in_model(32, MODEL, SCORING, emcl_attr="num_bases")   # K
    emcl_stages: int = in_model(9, MODEL, SCORING, emcl_attr="stage_num")   # EM iterations
    emcl_momentum: float = in_model(0.9, MODEL)
    emcl_lamd: float = in_model(1.0, MODEL, SCORING, emcl_attr="lamd")
    emcl_beta: float = in_model(3.0, MODEL, SCORING, emcl_attr="beta")
    # reference (±1 constants, collapses) | distinct (K distinct bases)
    emcl_init: str = in_model("reference", MODEL, SCORING, emcl_attr="init")

    # ---- training ----
    epochs: int = in_train(5, TRAINING)
    batch_size: int = in_train(128, TRAINING)       # global batch, split over processes
    lr: float = in_train(1e-4, TRAINING)            # new modules
    coef_lr: float = in_train(1e-3, TRAINING)       # CLIP parameters get lr * coef_lr
    # bertadam (the reference: Adam without bias correction) | adamw
    optimizer: str = in_train("bertadam", TRAINING)
    weight_decay: float = in_train(0.2, TRAINING)
    # norms: biases, norm gains, embeddings, logit_scale get no weight decay | reference: only names with
    # "bias" / "LayerNorm"
    decay_exempt: str = in_train("norms", TRAINING)
    warmup_proportion: float = in_train(0.1, TRAINING)
    # global gradient norm clip (and BertAdam's per-tensor clip); 1.0 as the reference
    grad_clip: float = in_train(1.0, TRAINING)
    # reference: each process gets what the reference's all-gather gives it (1/W of the gradient
    # for everything before the gather, logit_scale at full size) | exact: the true gradient
    ddp_gradients: str = in_train("exact", TRAINING)
    # fp16: CLIP's Linear/Conv weights and biases, attention in-projections, proj and
    # text_projection stored and updated in fp16 as the reference's convert_weights + fp16 BertAdam
    # (computed in fp16, no loss scaling) | fp32: fp32 master weights (autocast by `precision`)
    clip_dtype: str = in_train("fp32", TRAINING, EVAL_MAY_CHANGE)
    freeze_patch_embedding: bool = in_train(True, TRAINING)  # the reference freezes CLIP's visual.conv1
    # auto (bf16 on CUDA, fp16 without bf16, fp32 on CPU) | fp32 | bf16 | fp16
    precision: str = in_train("auto", TRAINING, EVAL_MAY_CHANGE)
    # steps between writes of log.jsonl (one host sync; NaN checks)
    log_every: int = in_train(10)
    progress: bool = in_train(True)                 # tqdm progress bars
    # torch.compile the training forward (the first step compiles; its time is printed)
    compile: bool = in_train(False)
    # stop after this many updates, the schedule fitted to them (a smoke test); 0 = the epochs'
    max_steps: int = in_train(0, TRAINING)
    # write TensorBoard event files to <run>/tensorboard (needs the [tensorboard] extra)
    tensorboard: bool = in_train(False)

    # ---- evaluation ----
    batch_size_val: int = in_eval(128)
    block_size: int = in_eval(32, SCORING)          # texts x videos per EMCL block (reference protocol)
    dsl_t2v_temp: float = in_eval(0.01, SCORING)
    dsl_v2t_temp: float = in_eval(0.01, SCORING)
    # QB-Norm row (dynamic inverted softmax, text-to-video): training captions in its query bank
    # (a sample seeded by seed; 0 = no row) and its beta
    qbnorm_bank: int = in_eval(5000)
    qbnorm_beta: float = in_eval(20.0)
    eval_every_epoch: bool = in_eval(True)          # validate each epoch on a non-test split where one exists
    # the reference's model selection as a labelled extra row: score its split (val: msvd, lsmdc; test:
    # others) at step 1 and every reference_eval_steps steps, keep the best as reference.pt
    reference_selection: bool = in_eval(False, SELECTION)
    # 0 = the reference's 3 * n_display: 150 (msrvtt), 30 (others)
    reference_eval_steps: int = in_eval(0, SELECTION)
    # settings of EMCL as an inference-only module (docs/method.md §7)
    inference_emcl_bases: int = in_eval(7, SCORING)
    inference_emcl_stages: int = in_eval(10, SCORING)
    inference_emcl_lamd: float = in_eval(0.1, SCORING)
    inference_emcl_beta: float = in_eval(4.0, SCORING)
    inference_block_size: int = in_eval(64, SCORING)
    # evaluate a run's checkpoints although the data differ from those it was trained on
    # (they are refused otherwise), with a warning
    allow_other_data: bool = in_eval(False)
    published: dict = in_eval({})                   # published numbers to compare against (release README)

    # ---- derived ----
    @property
    def out_dir(self) -> Path:
        """Where this run writes checkpoints, logs, metrics and executed notebooks."""
        return Path(self.output_root).expanduser() / self.dataset / self.run

    @property
    def reference_split(self) -> str:
        """The split the reference code selects its checkpoint on: val for MSVD and LSMDC
        (its only layouts with one), test for the others."""
        return "val" if self.layout in ("msvd", "lsmdc") else "test"

    @property
    def reference_interval(self) -> int:
        """Steps between the reference's evaluations: 3 * n_display (n_display 50 for
        MSR-VTT, 10 for the others), unless reference_eval_steps says otherwise."""
        return self.reference_eval_steps or (150 if self.layout == "msrvtt" else 30)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Params:
        """A copy with `changes` applied and validated like an override."""
        return check_combinations(_apply(self, changes, source="replace()"))


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "layout": ("msrvtt", "msvd", "lsmdc", "activity", "didemo"),
    "on_bad_sample": ("skip", "raise"),
    "augment_on": ("loader", "device"),
    "agg_module": ("None", "seqLSTM", "seqTransf"),
    "emcl": ("on", "off", "inference"),
    "pooling": ("text", "mean"),
    "optimizer": ("bertadam", "adamw"),
    "decay_exempt": ("norms", "reference"),
    "ddp_gradients": ("reference", "exact"),
    "clip_dtype": ("fp16", "fp32"),
    "emcl_init": ("reference", "distinct"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
}


def _single_folder_name(value: str) -> bool:
    return value not in ("", ".", "..") and not any(sep in value for sep in ("/", "\\", "\0"))


# Values that cannot be meant: field -> (test, what the value must be). Checked with the type,
# so a bad value is refused before any work starts and the message blames the setting.
LIMITS = {
    "lr": (lambda v: v >= 0, "at least 0"),
    "coef_lr": (lambda v: v >= 0, "at least 0 (CLIP's share of lr)"),
    "grad_clip": (lambda v: v >= 0, "at least 0 (the largest gradient norm kept; 0: no clipping)"),
    "warmup_proportion": (lambda v: 0 <= v < 1, "in [0, 1) (the share of steps spent warming up)"),
    "max_frames": (lambda v: v >= 1, "at least 1 (frames sampled per video)"),
    "max_train_videos": (lambda v: v >= 0, "at least 0 (0: every training video)"),
    "max_eval_videos": (lambda v: v >= 0, "at least 0 (0: every validation and test video)"),
    "max_steps": (lambda v: v >= 0, "at least 0 (0: every step of the epochs)"),
    "qbnorm_bank": (lambda v: v >= 0, "at least 0 (training queries in the QB-Norm bank; 0: no QB-Norm row)"),
    "video_framerate": (lambda v: v >= 1, "at least 1 (frames sampled per second)"),
    "batch_size": (lambda v: v >= 1, "at least 1 (the global batch)"),
    "batch_size_val": (lambda v: v >= 1, "at least 1 (the evaluation batch)"),
    "num_workers": (lambda v: v >= 0, "at least 0 (0: load in the main process)"),
    "num_threads": (lambda v: v >= 0, "at least 0 (0: torch's default)"),
    "log_every": (lambda v: v >= 1, "at least 1 (steps between log writes)"),
    "epochs": (lambda v: v >= 1, "at least 1"),
    "run": (_single_folder_name, "a single folder name (no '/', not '.' or '..'): "
                                 "outputs go to <output_root>/<dataset>/<run>/"),
    "dataset": (_single_folder_name, "a single folder name (no '/', not '.' or '..')"),
}
_TYPES = typing.get_type_hints(Params)
FIELDS = tuple(f.name for f in dataclasses.fields(Params))


def fields_where(*, section: str | None = None, role: str | None = None) -> tuple[str, ...]:
    """Names of the Params fields in `section` and/or with `role`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(Params)
                 if (section is None or f.metadata["section"] == section)
                 and (role is None or role in f.metadata["roles"]))


PATH_FIELDS = fields_where(role=PATH)
DATA_FIELDS = fields_where(role=DATA)
# Change the encoded features (the feature cache key):
FEATURE_FIELDS = DATA_FIELDS + fields_where(role=FEATURE)
# Define the trained model (taken from our checkpoints when evaluating them):
MODEL_FIELDS = fields_where(role=MODEL)
TRAINING_FIELDS = fields_where(role=TRAINING)
# Draw the synthetic set (checked only when params.synthetic is set):
SYNTHETIC_FIELDS = fields_where(section="synthetic")
SELECTION_FIELDS = fields_where(role=SELECTION)
# A run resumes only with the values it was started with; on_bad_sample may change, so
# that a run stopped by a bad video can go on.
RESUME_FIELDS = tuple(dict.fromkeys(MODEL_FIELDS + DATA_FIELDS + TRAINING_FIELDS + SYNTHETIC_FIELDS
                                    + SELECTION_FIELDS))
# A finished run is reused for evaluation only if it was trained on this data with this
# recipe; the training settings evaluation may change (tagged EVAL_MAY_CHANGE: precision, the
# seed of inference-only bases), the data fields and the model fields (taken from the
# checkpoint) are not checked.
REUSE_FIELDS = tuple(name for name in TRAINING_FIELDS
                     if name not in fields_where(role=EVAL_MAY_CHANGE)) + SYNTHETIC_FIELDS
# Settings that change only the scoring, never the features (re-scoring accepts them):
SCORING_FIELDS = fields_where(role=SCORING)
# Params field -> EMCL attribute, for re-scoring a trained model with other EMCL settings.
EMCL_SETTINGS = {f.name: f.metadata["emcl_attr"] for f in dataclasses.fields(Params)
                 if f.metadata["emcl_attr"]}


def synthetic_settings(params: Params | None = None) -> dict:
    """`generate_synthetic`'s arguments from the synthetic_* fields of `params` (default: the
    Params defaults, the one place they are stated): synthetic_train -> train, ..."""
    params = params or Params()
    return {name.removeprefix("synthetic_"): getattr(params, name)
            for name in SYNTHETIC_FIELDS if name != "synthetic"}


def available_datasets() -> list[str]:
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def _parse_text(text: str, kind: type):
    """A command-line / environment string as `kind`: "3" -> 3, "2e-3" -> 0.002, "true" -> True.
    Text that does not parse is returned unchanged, so the type check below names it."""
    try:
        return float(text) if kind is float else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        return text


def _coerce(key: str, value, source: str):
    """Check/convert one value to the declared type of `key`."""
    if key not in _TYPES:
        raise ParamsError(
            f"unknown parameter {key!r} (from {source}). Valid parameters: {', '.join(FIELDS)}")
    kind = _TYPES[key]
    if isinstance(value, str) and kind is not str:
        value = _parse_text(value, kind)
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or (
        kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ParamsError(f"parameter {key!r} (from {source}) must be {kind.__name__}, "
                          f"got {value!r} ({type(value).__name__})")
    value = float(value) if kind is float else value
    if key in CHOICES and value not in CHOICES[key]:
        raise ParamsError(f"parameter {key!r} (from {source}) must be one of "
                          f"{', '.join(CHOICES[key])}; got {value!r}")
    if key in LIMITS and not LIMITS[key][0](value):
        raise ParamsError(f"parameter {key!r} (from {source}) must be {LIMITS[key][1]}; got {value!r}")
    return value


def _apply(params: Params, changes: dict, source: str) -> Params:
    checked = {k: _coerce(k, v, source) for k, v in changes.items()}
    return dataclasses.replace(params, **checked)


# Folders the runs write to: a path that is an existing file is refused at load.
WRITTEN_FOLDERS = ("output_root", "frame_cache_dir")


def check_combinations(params: Params) -> Params:
    """Settings that are each valid but cannot go together (a ParamsError naming them)."""
    if params.clip_dtype == "fp16" and params.optimizer != "bertadam":
        raise ParamsError(f"clip_dtype=fp16 reproduces the reference's fp16 CLIP updated by its fp16 "
                          f"BertAdam; optimizer={params.optimizer!r} has no such update. Set "
                          f"optimizer=bertadam, or clip_dtype=fp32 (fp32 master weights)")
    if params.clip_dtype == "fp16" and params.precision not in ("auto", "fp16"):
        raise ParamsError(f"clip_dtype=fp16 computes CLIP in fp16 (its weights are fp16); "
                          f"precision={params.precision!r} cannot apply. Set precision=auto, or "
                          f"clip_dtype=fp32 to compute in {params.precision}")
    for key in WRITTEN_FOLDERS:
        value = getattr(params, key)
        if value and Path(value).expanduser().is_file():
            raise ParamsError(f"{key}={value!r} is a file; it must be a folder (where outputs are "
                              f"written). Set {key} to a folder path")
    return params


def parse_overrides(items, source: str = "overrides") -> dict:
    """`["epochs=2", "lr=1e-3"]` or `'epochs=2 video_path="/my videos"'` (split as a shell
    would) -> dict of raw values. A key given twice is a ParamsError: which one was meant?"""
    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, str):
        try:
            items = shlex.split(items)
        except ValueError as error:
            raise ParamsError(f"{source}: cannot split {items!r} into key=value items ({error}); "
                              f"close the quotes around a value with spaces") from None
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ParamsError(f"override {item!r} (from {source}) is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in out:
            raise ParamsError(f"{key!r} is set twice in {source} ({key}={out[key]} and {key}={value}); "
                              f"give it once")
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader (no tags that build Python objects) that refuses a key given twice
    in one mapping instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: Path) -> dict:
    """The mapping in a parameter file; a YAML error (syntax, a tag such as !!python/object,
    a duplicate key) is a ParamsError naming the file and the line. Nothing in it is run."""
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ParamsError(f"{where}: {problem}. Fix the file (plain YAML key: value pairs, "
                          f"each key once)") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of parameter: value")
    return raw


def load_params(dataset: str = "synthetic", overrides=None, *, use_env: bool = True) -> Params:
    """Read `params/<dataset>.yaml` (or a path to a YAML file), then apply `overrides`.

    Overrides may be a dict, a list of `key=value` strings or one string split as a shell
    would (quotes keep a value with spaces whole); a key given twice is an error.
    When `use_env`, the variable EMCL_NB_OVERRIDES is applied last.
    """
    path = Path(dataset)
    if path.suffix not in (".yaml", ".yml"):
        path = PARAMS_DIR / f"{dataset}.yaml"
    if not path.is_file():
        raise ParamsError(f"unknown dataset {dataset!r}: no parameter file {path}. "
                          f"Available: {', '.join(available_datasets()) or '(none)'}")
    raw = read_params_file(path)
    raw.setdefault("dataset", path.stem)
    params = _apply(Params(), raw, source=str(path))
    params = _apply(params, parse_overrides(overrides), source="overrides")
    env = os.environ.get(ENV_OVERRIDES, "").strip() if use_env else ""
    if env:
        print(f"[emcl_nb] applying {ENV_OVERRIDES}: {env}")
        params = _apply(params, parse_overrides(env, ENV_OVERRIDES), source=ENV_OVERRIDES)
    return check_combinations(_absolute_paths(params))


def _absolute_paths(params: Params) -> Params:
    """Relative data and output paths are relative to the repository root, so that the
    notebooks (run from notebooks/) and the command-line tools agree."""
    def resolve(value: str) -> str:
        if not value or value.startswith("~") or Path(value).is_absolute():
            return value
        return str(REPO_ROOT / value)
    return dataclasses.replace(params, **{key: resolve(getattr(params, key)) for key in PATH_FIELDS})


def save_params(params: Params, path: Path) -> None:
    """Write the parameters as YAML (atomically) so that a run can be reproduced."""
    atomic_write_text(Path(path), yaml.safe_dump(params.to_dict(), sort_keys=False))
