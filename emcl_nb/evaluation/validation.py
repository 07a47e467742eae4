"""Validation hooks for the training engine: the per-epoch validation and the reference's
step-wise model selection, each a `model -> metrics` callable built once per run."""
from __future__ import annotations

from collections.abc import Callable

import torch

from emcl_nb.data.annotations import has_split, load_annotations
from emcl_nb.evaluation.encode import encode_split, split_loaders
from emcl_nb.evaluation.scoring import evaluate_features
from emcl_nb.params import Params
from emcl_nb.training.distributed import env_from_torchrun


def _split_scorer(params: Params, split: str) -> Callable[[torch.nn.Module], dict]:
    """model -> metrics of `split`, encoded afresh (weights change during training; not
    cached). The loaders are built once, so their workers and decoded clips persist."""
    annotations = load_annotations(params, split)
    loaders = split_loaders(annotations, params)
    return lambda model: evaluate_features(
        encode_split(model, params, split, annotations=annotations, loaders=loaders), params, model)


def make_validator(params: Params) -> Callable[[torch.nn.Module], dict] | None:
    """The per-epoch validation for `engine.fit`: {"val": metrics} when the layout has a
    validation split that is not the test set and params.eval_every_epoch. None otherwise,
    and on every process but the main one (`engine.fit` validates on rank 0 only)."""
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
    if not (params.reference_selection and env_from_torchrun().is_main):
        return None
    if params.reference_split == "val" and validator is not None:
        return lambda model: validator(model)["val"]
    return _split_scorer(params, params.reference_split)
