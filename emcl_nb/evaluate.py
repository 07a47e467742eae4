"""Evaluation: encode a split once, cache the features, score them, compute the metrics.

    python -m emcl_nb.evaluate --params <name|yaml> [--checkpoint PATH] [--split test]
                               [--emcl on|off|inference] [--set key=value ...]

1. `encode_split`: every text and every video of a split encoded exactly once (a video is
   not re-encoded per caption, reference-defects.md #10) -> `Features`.
2. `load_or_encode`: the same, through a cache `out_dir/features/<split>-<tag>.pt`. The tag
   hashes everything that changes the features: the encoder weights (the EMCL bases are
   left out: they act after encoding), the annotations and video files, max_words,
   max_frames, video_framerate, image_size, the precision. Re-scoring with other EMCL
   settings never re-encodes a video.
3. `score`: the similarity matrix [texts, videos] with the block protocol
   (evaluation.md, reference-defects.md #3) and one of three EMCL modes: "on" (the model's
   trained module, or a fresh one when K / stages / λ / β / init are overridden), "off"
   (pooling + cosine), "inference" (EMCL applied at test time only, method.md §7).
4. `evaluate_model` / `make_validator` / `make_reference_validator` / `evaluate_run`:
   plain and DSL metrics, the per-epoch validation and the reference's step-wise selection
   used by the training engine, and the final report (`out_dir/metrics.json`,
   `out_dir/metrics.md`) beside the published numbers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch.utils.data import DataLoader

from emcl_nb.checkpoint import CheckpointError, load_model_weights, read_checkpoint, seeded_emcl
from emcl_nb.io import atomic_torch_save, atomic_write_json, atomic_write_text
from emcl_nb.metrics import DSL, PLAIN, TIE_RULE, evaluate_similarity, format_table
from emcl_nb.params import (CHOICES, EMCL_SETTINGS, FEATURE_FIELDS, MODEL_FIELDS, REPO_ROOT,
                            SCORING_FIELDS, Params, ParamsError, load_params, parse_overrides)
from emcl_nb.progress import progress_bar
from emcl_nb.runtime import autocast, autocast_dtype, configure_torch
from emcl_nb.similarity import similarity_matrix

REFERENCE_PROTOCOL = "reference protocol"
# A text whose scores over all videos span less than this scores them alike (float32 cosines).
CONSTANT_SPREAD = 1e-5
CACHE_VERSION = 3                # 2: Features.dropped; 3: the fp32 head (features differ under autocast)
UNREADABLE_VIDEO = "unreadable video"


def note(text: str, notes: list | None = None) -> None:
    """Print a note for the user and keep it with the results."""
    print(f"[emcl_nb] note: {text}")
    if notes is not None:
        notes.append(text)


# ---------------------------------------------------------------------------------------
# 1. Encoding
# ---------------------------------------------------------------------------------------

@dataclass
class Features:
    """Encoded split: every text and every video once, on the CPU in float32."""
    split: str
    text: torch.Tensor           # [A, D] EOT features, not normalised
    video: torch.Tensor          # [V, T, D] frame features after temporal aggregation
    frame_mask: torch.Tensor     # [V, T] int64, 0 = padded frame
    text_video: torch.Tensor     # [A] int64 index (row of `video`) of each text's video
    video_ids: list[str]
    captions: list[str]
    skipped_videos: list[str] = field(default_factory=list)   # unreadable, left out with their texts
    dropped: dict = field(default_factory=dict)   # reason -> texts (queries) left out of the split

    @property
    def n_texts(self) -> int:
        return self.text.shape[0]

    @property
    def n_videos(self) -> int:
        return self.video.shape[0]

    @property
    def single_sentence(self) -> bool:
        """One caption per video, text i <-> video i: the true pairs are the diagonal."""
        return self.n_texts == self.n_videos and torch.equal(self.text_video, torch.arange(self.n_texts))

    def to_dict(self) -> dict:
        return dict(vars(self))


def split_loaders(annotations, params: Params, persistent: bool = True) -> tuple[DataLoader, DataLoader]:
    """(texts, videos) loaders of one split for `encode_split`. Kept across calls (as the
    per-epoch validation does), their workers and decoded-clip caches persist."""
    from emcl_nb.data.dataset import TextDataset, VideoDataset, build_loader
    return (build_loader(TextDataset(annotations, params), params, train=False, persistent=persistent),
            build_loader(VideoDataset(annotations, params), params, train=False, persistent=persistent))


def encode_split(model, params: Params, split: str, device: torch.device | None = None, *,
                 annotations=None, loaders: tuple[DataLoader, DataLoader] | None = None) -> Features:
    """Encode every text and every video of `split` once (batch_size_val per batch).

    `loaders`: `split_loaders(annotations, params)` to reuse (built here when None, for
    this one pass: their workers end with it).
    Videos that cannot be read are skipped when params.on_bad_sample == "skip": they and
    their texts are left out with a warning, and listed in `skipped_videos`.
    """
    from emcl_nb.data.annotations import load_annotations

    annotations = annotations if annotations is not None else load_annotations(params, split)
    text_loader, video_loader = loaders or split_loaders(annotations, params, persistent=False)
    device = device or model.device
    model.eval()
    n_texts, n_videos, T = len(annotations), annotations.num_videos, params.max_frames
    text = torch.zeros(n_texts, model.embed_dim)
    video = torch.zeros(n_videos, T, model.embed_dim)
    frame_mask = torch.zeros(n_videos, T, dtype=torch.int64)
    present = torch.zeros(n_videos, dtype=torch.bool)
    bar = dict(disable=not params.progress, leave=False, unit="batch")

    with torch.no_grad(), autocast(device, autocast_dtype(device, params.precision)):
        for batch in progress_bar(text_loader, desc=f"encode {split} texts", **bar):
            features = model.encode_text(batch["text_ids"].to(device), batch["text_mask"].to(device))
            text[batch["index"]] = features.float().cpu()                                 # [B, D]
        for batch in progress_bar(video_loader, desc=f"encode {split} videos", **bar):
            features = model.encode_video(batch["video"].to(device), batch["frame_mask"].to(device))
            index = batch["video_index"]
            video[index] = features.float().cpu()                                         # [B, T, D]
            frame_mask[index] = batch["frame_mask"]
            present[index] = True

    text_video = torch.from_numpy(annotations.video_index).long()
    result = Features(split, text, video, frame_mask, text_video, list(annotations.video_ids),
                      [sample.caption for sample in annotations.samples],
                      dropped=dict(annotations.dropped))
    return result if present.all() else _drop_videos(result, present)


def _drop_videos(features: Features, present: torch.Tensor) -> Features:
    """Leave out the videos that were not read, and their texts (re-indexing the rest)."""
    skipped = [vid for vid, ok in zip(features.video_ids, present.tolist()) if not ok]
    if not present.any():
        raise RuntimeError(f"no video of the {features.split} split could be read; "
                           f"the warnings above name the files")
    new_index = torch.cumsum(present.long(), 0) - 1                                       # [V]
    keep_text = present[features.text_video]                                              # [A]
    warnings.warn(f"{len(skipped)} unreadable {features.split} video(s) and {int((~keep_text).sum())} "
                  f"caption(s) left out of the evaluation: {skipped[:5]}", stacklevel=3)
    return Features(
        features.split, features.text[keep_text], features.video[present],
        features.frame_mask[present], new_index[features.text_video[keep_text]],
        [vid for vid, ok in zip(features.video_ids, present.tolist()) if ok],
        [c for c, ok in zip(features.captions, keep_text.tolist()) if ok], skipped,
        {**features.dropped, UNREADABLE_VIDEO: int((~keep_text).sum())})


# ---------------------------------------------------------------------------------------
# 2. Feature cache
# ---------------------------------------------------------------------------------------

def weights_fingerprint(model) -> str:
    """SHA-256 of the encoder weights (names, dtypes, shapes, bytes). The EMCL bases are left
    out: they act after encoding, so re-scoring with other bases reuses the features.

    Cached on the model (`_emcl_nb_fingerprint`) and recomputed only when a tensor is
    replaced or updated in place (its storage or version counter changes). Writes through
    `tensor.data` bypass the version counter and are not seen."""
    encoder = sorted((name, tensor) for name, tensor in model.state_dict(keep_vars=True).items()
                     if not name.startswith("emcl."))
    stamp = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in encoder)
    cached = getattr(model, "_emcl_nb_fingerprint", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in encoder:
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    model._emcl_nb_fingerprint = (stamp, digest.hexdigest())
    return model._emcl_nb_fingerprint[1]


def annotations_fingerprint(annotations) -> str:
    """SHA-256 of the captions, their videos and each video file's size and mtime."""
    digest = hashlib.sha256()
    for sample, video_index in zip(annotations.samples, annotations.video_index.tolist()):
        digest.update(f"{sample.caption}|{video_index}|{sample.start}|{sample.end}\n".encode())
    for video_id, path in zip(annotations.video_ids, annotations.video_paths):
        stat = Path(path).stat()
        digest.update(f"{video_id}|{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def feature_key(model, params: Params, split: str, annotations, device: torch.device) -> dict:
    """Everything the features of `split` depend on."""
    return {"version": CACHE_VERSION, "split": split, "weights": weights_fingerprint(model),
            "annotations": annotations_fingerprint(annotations),
            "precision": str(autocast_dtype(device, params.precision) or torch.float32),
            **{name: getattr(params, name) for name in FEATURE_FIELDS}}


def cache_path(params: Params, key: dict) -> Path:
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return params.out_dir / "features" / f"{key['split']}-{tag}.pt"


def load_or_encode(model, params: Params, split: str, device: torch.device | None = None, *,
                   cache: bool = True, annotations=None) -> Features:
    """`encode_split` through the cache in out_dir/features (written atomically).
    A cached file whose key does not match, or that cannot be read, is re-encoded."""
    from emcl_nb.data.annotations import load_annotations

    if not cache:
        return encode_split(model, params, split, device, annotations=annotations)
    annotations = annotations if annotations is not None else load_annotations(params, split)
    device = device or model.device
    key = feature_key(model, params, split, annotations, device)
    path = cache_path(params, key)
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["key"] == key:
                return Features(**stored["features"])
        except Exception as error:  # noqa: BLE001 - a broken cache file is re-made
            note(f"feature cache {path} is unreadable ({error}); encoding again")
    features = encode_split(model, params, split, device, annotations=annotations)
    atomic_torch_save({"key": key, "features": features.to_dict()}, path)
    return features


# ---------------------------------------------------------------------------------------
# 3. Scoring
# ---------------------------------------------------------------------------------------

@dataclass
class Scoring:
    """How a similarity matrix is computed: the EMCL module (or None), where features are
    normalised (block_logits), the block size, the settings used and notes for the user."""
    mode: str
    emcl: torch.nn.Module | None
    normalize: str
    block_size: int
    dsl_temps: tuple[float, float]       # (t2v, v2t) DSL temperatures
    settings: dict
    notes: list[str] = field(default_factory=list)


def scoring_setup(model, params: Params, emcl_mode: str | None = None, **overrides) -> Scoring:
    """The scoring of `emcl_mode` (default: the model's own, model.config.emcl), with
    `overrides` of SCORING_FIELDS.

    on:        the model's trained EMCL module. Overriding K / stages / λ / β / init builds a
               fresh module with those settings; it keeps the trained bases when K and init
               match, otherwise it draws initial bases from params.seed (with a note).
    off:       the model's pooling + cosine, no EMCL.
    inference: EMCL as an inference-only module (method.md §7): inference_emcl_* settings,
               reference init drawn from params.seed, inference_block_size blocks, applied to
               the L2-normalised embeddings with no renormalisation afterwards. With mean
               pooling this is the EMCL block of the reference inference module (V video + A text rows per
               block; its logits divided by logit_scale, the same ranks); with text pooling
               the A*V text-pooled rows (our extension).
    """
    mode = emcl_mode or model.config.emcl
    if mode not in CHOICES["emcl"]:
        raise ParamsError(f"emcl_mode must be one of {', '.join(CHOICES['emcl'])}; got {mode!r}")
    not_scoring = sorted(set(overrides) - set(SCORING_FIELDS))
    if not_scoring:
        raise ParamsError(f"{', '.join(not_scoring)} cannot be changed when re-scoring: only "
                          f"{', '.join(SCORING_FIELDS)} can. Settings that change the features "
                          f"(e.g. max_frames) go in params, and the split is encoded again.")
    p = params.replace(**overrides)
    device, dsl_temps = model.device, (p.dsl_t2v_temp, p.dsl_v2t_temp)
    if mode == "off":
        return Scoring(mode, None, "after", p.block_size, dsl_temps, {"block_size": p.block_size})

    if mode == "inference":
        settings = dict(num_bases=p.inference_emcl_bases, stage_num=p.inference_emcl_stages,
                        lamd=p.inference_emcl_lamd, beta=p.inference_emcl_beta, init="reference")
        emcl = seeded_emcl(p.seed, momentum=p.emcl_momentum, dim=model.embed_dim, **settings)
        return Scoring(mode, emcl.to(device), "before", p.inference_block_size, dsl_temps,
                       {**settings, "seed": p.seed, "block_size": p.inference_block_size})

    trained = model.emcl
    current = {attr: getattr(trained, attr) for attr in EMCL_SETTINGS.values()}
    wanted = {**current, **{EMCL_SETTINGS[k]: getattr(p, k) for k in overrides if k in EMCL_SETTINGS}}
    scoring = Scoring(mode, trained, "after", p.block_size, dsl_temps,
                      {**wanted, "block_size": p.block_size})
    if model.config.emcl != "on":
        note(f"the model was trained with emcl={model.config.emcl}: its EMCL module holds "
             f"untrained initial bases", scoring.notes)
    if wanted != current:
        scoring.emcl = seeded_emcl(p.seed, momentum=trained.momentum, dim=model.embed_dim,
                                   **wanted).to(device)
        if (wanted["num_bases"], wanted["init"]) == (current["num_bases"], current["init"]):
            scoring.emcl.load_state_dict(trained.state_dict())              # the trained bases
        else:
            scoring.settings["seed"] = p.seed
            note(f"EMCL re-scored with {wanted}: the trained bases have K={current['num_bases']}, "
                 f"init={current['init']!r}, so initial bases were drawn from seed {p.seed}",
                 scoring.notes)
    return scoring


def score(features: Features, params: Params, model, *, emcl_mode: str | None = None,
          **overrides) -> torch.Tensor:
    """Similarity matrix [texts, videos] (float32, CPU) of cached or fresh `features`.
    See `scoring_setup` for the modes and overrides. Puts the model in eval mode."""
    return _score(features, model, scoring_setup(model.eval(), params, emcl_mode, **overrides))


def _score(features: Features, model, scoring: Scoring) -> torch.Tensor:
    device = model.device
    sim = similarity_matrix(features.text.to(device), features.video.to(device),
                            features.frame_mask.to(device), temp=model.temp, emcl=scoring.emcl,
                            block_size=scoring.block_size, normalize=scoring.normalize,
                            pooling=model.pooling)
    return sim.float().cpu()                                                   # [A, V]


# ---------------------------------------------------------------------------------------
# 4. Metrics
# ---------------------------------------------------------------------------------------

def evaluate_features(features: Features, params: Params, model, *, emcl_mode: str | None = None,
                      scoring: Scoring | None = None, **overrides) -> dict:
    """Plain and DSL metrics of `features` scored with `model` (see `score`).

    One caption per video: ranks against the diagonal; several (MSVD, MSR-VTT val):
    multi-sentence metrics with each text's video. Returns {"t2v", "v2t", "dsl_t2v",
    "dsl_v2t" (the DSL ones use the whole test query bank: transductive), "n_texts",
    "n_videos", "chance_R1", "protocol", "emcl_mode", "scoring", "notes", "dropped_queries"
    (reason -> texts left out before scoring), "constant_rows" (texts scoring every video
    alike: a collapsed model), ...}.
    `scoring`: a `scoring_setup` result to reuse (it must match `emcl_mode` and `overrides`).
    """
    scoring = scoring or scoring_setup(model.eval(), params, emcl_mode, **overrides)
    sim = _score(features, model, scoring)
    text_video = None if features.single_sentence else features.text_video
    metrics = evaluate_similarity(sim, text_video, dsl_temps=scoring.dsl_temps)
    return {
        "split": features.split,
        "t2v": metrics[PLAIN]["t2v"], "v2t": metrics[PLAIN]["v2t"],
        "dsl_t2v": metrics[DSL]["t2v"], "dsl_v2t": metrics[DSL]["v2t"], "dsl": DSL,
        "n_texts": features.n_texts, "n_videos": features.n_videos,
        "chance_R1": 100.0 / features.n_videos,
        "protocol": "single-sentence" if text_video is None else "multi-sentence",
        "emcl_mode": scoring.mode, "scoring": scoring.settings, "notes": scoring.notes,
        "skipped_videos": features.skipped_videos, "dropped_queries": features.dropped,
        "constant_rows": int((sim.amax(dim=1) - sim.amin(dim=1) <= CONSTANT_SPREAD).sum()),
    }


def evaluate_model(model, params: Params, split: str = "test", *, emcl_mode: str | None = None,
                   cache: bool = True, device: torch.device | None = None, **overrides) -> dict:
    """Encode `split` (through the feature cache when `cache`), score it, return the metrics
    of `evaluate_features`."""
    features = load_or_encode(model, params, split, device, cache=cache)
    return evaluate_features(features, params, model, emcl_mode=emcl_mode, **overrides)


def _split_scorer(params: Params, split: str) -> Callable[[torch.nn.Module], dict]:
    """model -> metrics of `split`, encoded afresh (weights change during training; not
    cached). The loaders are built once, so their workers and decoded clips persist."""
    from emcl_nb.data.annotations import load_annotations

    annotations = load_annotations(params, split)
    loaders = split_loaders(annotations, params)
    return lambda model: evaluate_features(
        encode_split(model, params, split, annotations=annotations, loaders=loaders), params, model)


def make_validator(params: Params) -> Callable[[torch.nn.Module], dict] | None:
    """The per-epoch validation for `engine.fit`: {"val": metrics} when the layout has a
    validation split that is not the test set and params.eval_every_epoch. None otherwise,
    and on every process but the main one (`engine.fit` validates on rank 0 only)."""
    from emcl_nb.data.annotations import has_split
    from emcl_nb.distributed import env_from_torchrun

    if not (env_from_torchrun().is_main and params.eval_every_epoch and has_split(params, "val")):
        return None
    scorer = _split_scorer(params, "val")
    return lambda model: {"val": scorer(model)}


def make_reference_validator(params: Params, validator=None) -> Callable[[torch.nn.Module], dict] | None:
    """The reference's model selection for `engine.fit` (params.reference_selection): the
    metrics of params.reference_split (val for MSVD and LSMDC, test otherwise), scored every
    params.reference_interval steps. None when not asked, and on every process but the main one.
    When it selects on val, the per-epoch `validator` (make_validator) is reused: one set of
    val loaders, workers and decoded clips serves both."""
    from emcl_nb.distributed import env_from_torchrun

    if not (params.reference_selection and env_from_torchrun().is_main):
        return None
    if params.reference_split == "val" and validator is not None:
        return lambda model: validator(model)["val"]
    return _split_scorer(params, params.reference_split)


# ---------------------------------------------------------------------------------------
# 5. Evaluating a run's checkpoints
# ---------------------------------------------------------------------------------------

def load_for_evaluation(path: str | Path, params: Params, device: torch.device):
    """(model, params, load report) for a checkpoint file. Our checkpoints carry their model
    config (older ones: their run's parameters): the model is built with its MODEL_FIELDS (a
    note says where they differ from `params`); a reference checkpoint is built from `params`
    as given."""
    from emcl_nb.model import build_model

    path = Path(path)
    state = read_checkpoint(path)
    ours = isinstance(state, dict) and "format" in state
    trained = (state.get("model_config") or state.get("params")) if ours else None
    if trained:
        changes = {name: trained[name] for name in MODEL_FIELDS
                   if name in trained and trained[name] != getattr(params, name)}
        for name, value in changes.items():
            note(f"{path.name} was trained with {name}={value!r}; using it "
                 f"(params say {getattr(params, name)!r})")
        params = params.replace(**changes)
    model = build_model(params)
    report = load_model_weights(model, state, source=str(path))
    return model.to(device).eval(), params, report


class LoadedSplit(NamedTuple):
    """A checkpoint ready to score one split: the model, the parameters it was built with,
    its load report and the split's features (from the feature cache)."""
    model: torch.nn.Module
    params: Params
    report: object
    features: Features


def load_split(path: str | Path, params: Params, split: str = "test") -> LoadedSplit:
    """Load a checkpoint on params.device and encode `split` through the feature cache (what
    the evaluation, ablation and attention notebooks start from)."""
    from emcl_nb.distributed import DistEnv, resolve_device

    device = resolve_device(params.device, DistEnv())
    model, run_params, report = load_for_evaluation(path, params, device)
    return LoadedSplit(model, run_params, report, load_or_encode(model, run_params, split, device))


def reference_protocol_label(out_dir: Path) -> str | None:
    """The row label of the run's reference-protocol checkpoint (checkpoints/reference.pt),
    naming the split and step it was selected on; None when the run has none."""
    path = out_dir / "reference.json"
    if not (out_dir / "checkpoints" / "reference.pt").is_file() or not path.is_file():
        return None
    selection = json.loads(path.read_text())
    return (f"{REFERENCE_PROTOCOL} (selected on {selection['split']} every {selection['every']} "
            f"steps: step {selection['best']['step']})")


def _table_rows(results: dict) -> dict:
    """{row label: {"t2v", "v2t"}} with a DSL row after each plain row that has one."""
    rows = {}
    for label, result in results.items():
        rows[label] = {"t2v": result["t2v"], "v2t": result["v2t"]}
        if "dsl_t2v" in result:
            rows[f"{label} + DSL (whole test query bank)"] = {"t2v": result["dsl_t2v"],
                                                             "v2t": result["dsl_v2t"]}
    return rows


def dropped_statement(result: dict, split: str) -> str:
    """How many of the split's queries (texts) were scored, and why the others were not.
    Listed videos without captions are counted apart: they are videos, not queries."""
    from emcl_nb.data.annotations import NO_CAPTIONS

    dropped = dict(result.get("dropped_queries") or {})
    uncaptioned = dropped.pop(NO_CAPTIONS, 0)
    total = result["n_texts"] + sum(dropped.values())
    if not dropped:
        statement = f"all {total} {split} queries scored, none dropped"
    else:
        reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
        statement = (f"{result['n_texts']} of {total} {split} queries scored; {sum(dropped.values())} "
                     f"dropped ({reasons}; see the warnings of the run for the ids)")
    if uncaptioned:
        statement += f"; {uncaptioned} listed video(s) without captions left out"
    return statement


def _report_markdown(params: Params, split: str, results: dict, table: str) -> str:
    first = next(iter(results.values()))
    lines = [f"# {params.dataset} / {params.run}: {split} split", "", table, "",
             f"- {first['n_texts']} texts, {first['n_videos']} videos ({first['protocol']}); "
             f"chance R@1 = {first['chance_R1']:.2f} %.",
             f"- {dropped_statement(first, split)}",
             f"- {TIE_RULE}.",
             f"- '+ DSL' rows: {DSL}; reported beside the plain numbers, never instead of them."]
    if any(label.startswith(REFERENCE_PROTOCOL) for label in results):
        lines.append(f"- '{REFERENCE_PROTOCOL}': the checkpoint the reference code keeps (best "
                     "T2V R@1 at step 1 and every 3 * n_display steps); selected on test for "
                     "MSR-VTT, ActivityNet and DiDeMo, so optimistic: only for comparing with the paper.")
    for label, result in results.items():
        lines += [f"- {label}: {text}" for text in result.get("notes", [])]
        if "n_texts" in result and result.get("dropped_queries") != first.get("dropped_queries"):
            lines.append(f"- {label}: {dropped_statement(result, split)}")
    return "\n".join(lines) + "\n"


def _checkpoint_path(entry: str | Path, params: Params) -> Path:
    """out_dir/checkpoints/<entry>.pt for "best" / "last" / "reference"; otherwise the path
    given, a relative one taken from the repository root (as params paths are)."""
    if entry in ("best", "last", "reference"):
        return params.out_dir / "checkpoints" / f"{entry}.pt"
    path = Path(entry).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def evaluate_run(params: Params, checkpoints=("best", "last"), *, split: str = "test",
                 emcl_mode: str | None = None, name: str = "metrics", cache: bool = True,
                 **overrides) -> dict:
    """Evaluate a run's checkpoints on `split` and write out_dir/<name>.json and .md.

    `checkpoints`: "best" / "last" (out_dir/checkpoints/<name>.pt; a missing best.pt is
    skipped) or paths (ours or reference-code files; relative ones from the repository
    root). The first row is the headline: best on validation where a validation split
    exists, else the last epoch. When the run kept a reference-protocol checkpoint
    (params.reference_selection), it is scored too, as the labelled row
    "reference protocol (selected on <split> every <n> steps: step <s>)", key
    "reference_protocol", but only when every checkpoint asked for is this run's own
    (out_dir/checkpoints): the row describes this run. `overrides`: SCORING_FIELDS, see `score`.
    """
    from emcl_nb.distributed import DistEnv, resolve_device

    configure_torch(params)
    device = resolve_device(params.device, DistEnv())
    results, rows = {}, {}
    own_folder = (params.out_dir / "checkpoints").resolve()
    paths = [_checkpoint_path(entry, params) for entry in checkpoints]
    foreign = [str(path) for path in paths if path.resolve().parent != own_folder]
    reference_label = reference_protocol_label(params.out_dir)
    if reference_label is not None and foreign:
        note(f"no '{REFERENCE_PROTOCOL}' row: it belongs to run {params.run!r}, and "
             f"{', '.join(foreign)} is not one of that run's checkpoints")
    elif reference_label is not None:
        checkpoints = (*checkpoints, "reference")
    for entry in checkpoints:
        path = _checkpoint_path(entry, params)
        if entry == "best" and not path.is_file():
            note(f"no {path} (no validation split selected a best epoch); evaluating last only")
            continue
        model, run_params, report = load_for_evaluation(path, params, device)
        result = evaluate_model(model, run_params, split, emcl_mode=emcl_mode, cache=cache,
                                device=device, **overrides)
        result.update(checkpoint=str(path), epoch=report.epoch, layout=report.layout,
                      recreated_emcl_bases=report.recreated)
        if entry == "reference":
            results["reference_protocol"], rows[reference_label] = result, result
            continue
        key = entry if entry in ("best", "last") else path.name
        label = {"best": "best on val", "last": "last"}.get(entry, path.name)
        results[key] = result
        rows[label + (f" (epoch {report.epoch})" if report.epoch is not None else "")] = result
    if not results:
        raise CheckpointError(f"no checkpoint to evaluate among {list(checkpoints)}")

    published = params.published if split == "test" else {}
    table = format_table(_table_rows(rows), published)
    summary = {"dataset": params.dataset, "run": params.run, "split": split,
               "emcl_mode": emcl_mode or "trained setting", "overrides": overrides,
               "results": results, "published": published, "table": table}
    atomic_write_json(params.out_dir / f"{name}.json", summary)
    atomic_write_text(params.out_dir / f"{name}.md",
                      _report_markdown(params, split, rows, table))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="synthetic",
                        help="a dataset name (params/<name>.yaml) or a path to a YAML file")
    parser.add_argument("--checkpoint", action="append", metavar="PATH",
                        help="a checkpoint file to evaluate (ours or the reference code's; "
                             "a relative path is taken from the repository root); "
                             "repeatable. Default: the run's best.pt (if any) and last.pt")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--emcl", choices=CHOICES["emcl"], default=None,
                        help="scoring mode; default: the mode the model was trained with")
    parser.add_argument("--name", default="metrics", help="output file name in the run folder")
    parser.add_argument("--no-cache", action="store_true", help="encode without the feature cache")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"override parameters; scoring settings ({', '.join(SCORING_FIELDS)}) "
                             f"re-score cached features without encoding again")
    args = parser.parse_args(argv)
    sets = parse_overrides(args.set)
    emcl_mode = args.emcl or sets.pop("emcl", None)
    overrides = {key: sets.pop(key) for key in list(sets) if key in SCORING_FIELDS}
    params = load_params(args.params, sets)
    summary = evaluate_run(params, args.checkpoint or ("best", "last"), split=args.split,
                           emcl_mode=emcl_mode, name=args.name, cache=not args.no_cache, **overrides)
    print(summary["table"])
    print(f"[emcl_nb] wrote {params.out_dir / (args.name + '.json')} and {args.name}.md")


if __name__ == "__main__":
    main()
