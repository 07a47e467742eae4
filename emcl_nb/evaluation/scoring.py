"""Scoring encoded features: the similarity matrix and its metrics.

`scoring_setup` decides how a matrix is computed, with the block protocol
(docs/evaluation.md, docs/reference-differences.md #3) and one of three EMCL modes: "on"
(the model's trained module, or a fresh one when K / stages / λ / β / init are overridden),
"off" (pooling + cosine), "inference" (EMCL applied at test time only, docs/method.md §7).
`score` gives the matrix, `evaluate_features` / `evaluate_model` the plain and DSL metrics
(and QB-Norm's, given a query bank: emcl_nb.evaluation.querybank).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from emcl_nb.evaluation.encode import Features, load_or_encode
from emcl_nb.evaluation.querybank import QueryBank, query_bank
from emcl_nb.model.emcl import seeded_emcl
from emcl_nb.model.metrics import DSL, PLAIN, evaluate_qbnorm, evaluate_similarity
from emcl_nb.model.similarity import similarity_matrix
from emcl_nb.params import CHOICES, EMCL_SETTINGS, SCORING_FIELDS, Params, ParamsError
from emcl_nb.progress import note, timed

# A text whose scores over all videos span less than this scores them alike (float32 cosines).
CONSTANT_SPREAD = 1e-5


@dataclass
class Scoring:
    """How a similarity matrix is computed: the EMCL module (or None), where features are
    normalised (block_logits), the block size, the settings used and notes for the user."""
    mode: str
    emcl_module: torch.nn.Module | None   # the EMCL module scoring uses; None: no EMCL
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
    inference: EMCL as an inference-only module (docs/method.md §7): inference_emcl_* settings,
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
        scoring.emcl_module = seeded_emcl(p.seed, momentum=trained.momentum, dim=model.embed_dim,
                                   **wanted).to(device)
        if (wanted["num_bases"], wanted["init"]) == (current["num_bases"], current["init"]):
            scoring.emcl_module.load_state_dict(trained.state_dict())              # the trained bases
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
    return score_with(features, model, scoring_setup(model.eval(), params, emcl_mode, **overrides))


def score_with(features: Features, model, scoring: Scoring, text: torch.Tensor | None = None) -> torch.Tensor:
    """Similarity matrix [texts, videos] under a prepared `scoring` (set up once, reused).
    `text`: other queries [B, D] scored against the split's videos (default: its own texts)."""
    device = model.device
    text = features.text if text is None else text
    sim = similarity_matrix(text.to(device), features.video.to(device),
                            features.frame_mask.to(device), temp=model.temp, emcl_module=scoring.emcl_module,
                            block_size=scoring.block_size, normalize=scoring.normalize,
                            pooling=model.pooling)
    return sim.float().cpu()                                                   # [A, V]


def evaluate_features(features: Features, params: Params, model, *, emcl_mode: str | None = None,
                      bank: QueryBank | None = None, **overrides) -> dict:
    """Plain and DSL metrics of `features` scored with `model` (see `score`).

    One caption per video: ranks against the diagonal; several (MSVD, MSR-VTT val):
    multi-sentence metrics with each text's video. Returns {"t2v", "v2t", "dsl_t2v",
    "dsl_v2t" (the DSL ones use the whole test query bank: transductive), "n_texts",
    "n_videos", "chance_R1", "protocol", "emcl_mode", "scoring", "notes", "dropped_queries"
    (reason -> texts left out before scoring), "constant_rows" (texts scoring every video
    alike: a collapsed model), ...}. With a QB-Norm `bank` (evaluation.querybank), also
    "qbnorm_t2v" (its text-to-video metrics, params.qbnorm_beta) and "qbnorm" (the bank).
    """
    scoring = scoring_setup(model.eval(), params, emcl_mode, **overrides)
    sim = score_with(features, model, scoring)
    text_video = None if features.single_sentence else features.text_video
    metrics = evaluate_similarity(sim, text_video, dsl_temps=scoring.dsl_temps)
    result = {
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
    if bank is not None:
        bank_sim = score_with(features, model, scoring, text=bank.text)                # [B, V]
        result.update(qbnorm_t2v=evaluate_qbnorm(sim, bank_sim, text_video, params.qbnorm_beta)["t2v"],
                      qbnorm=bank.describe(params.qbnorm_beta))
    return result


def evaluate_model(model, params: Params, split: str = "test", *, emcl_mode: str | None = None,
                   cache: bool = True, device: torch.device | None = None, qbnorm: bool = False,
                   **overrides) -> dict:
    """Encode `split` (through the feature cache when `cache`), score it, return the metrics
    of `evaluate_features`; with `qbnorm`, the QB-Norm row's too (the run's query bank)."""
    features = load_or_encode(model, params, split, device, cache=cache)
    with timed("query bank"):
        bank = query_bank(model, params, device, cache=cache) if qbnorm else None
    with timed("score"):
        return evaluate_features(features, params, model, emcl_mode=emcl_mode, bank=bank, **overrides)
