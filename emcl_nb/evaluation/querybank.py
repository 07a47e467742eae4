"""The query bank of QB-Norm (emcl_nb.model.metrics.qb_norm): a sample of training captions,
encoded by the model being evaluated, against which the test queries are normalised.

The bank holds params.qbnorm_bank captions of the training split (all of them when it has
fewer), drawn with params.seed, so every checkpoint of a run gets the same bank. Its text
features are cached like a split's (out_dir/features/qbnorm-bank-<tag>.pt, keyed by the
encoder weights, the captions, max_words and the precision).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from emcl_nb.data.annotations import has_split, load_annotations
from emcl_nb.evaluation.encode import CACHE_VERSION, cache_path, encode_captions, weights_fingerprint
from emcl_nb.params import Params
from emcl_nb.progress import note
from emcl_nb.training.checkpoint import atomic_torch_save
from emcl_nb.training.runtime import autocast_dtype

BANK_SPLIT = "train"


@dataclass
class QueryBank:
    """Training queries encoded by the model: text [B, D] float32 on the CPU."""
    text: torch.Tensor
    split: str
    available: int               # captions in the split the sample was drawn from

    @property
    def size(self) -> int:
        return self.text.shape[0]

    def describe(self, beta: float) -> dict:
        return {"bank": self.size, "split": self.split, "available": self.available, "beta": beta}


def bank_captions(params: Params) -> tuple[list[str], int]:
    """(the sampled captions in split order, the captions the split has)."""
    captions = [sample.caption for sample in load_annotations(params, BANK_SPLIT).samples]
    chosen = torch.randperm(len(captions), generator=torch.Generator().manual_seed(params.seed))
    chosen = chosen[:params.qbnorm_bank].sort().values
    return [captions[i] for i in chosen.tolist()], len(captions)


def query_bank(model, params: Params, device: torch.device | None = None, *, cache: bool = True) -> QueryBank | None:
    """The run's QB-Norm bank encoded by `model`; None (with a note) when qbnorm_bank is 0 or
    the layout's training annotations are not there."""
    if params.qbnorm_bank == 0:
        return None
    if not has_split(params, BANK_SPLIT):
        note(f"no QB-Norm row: its query bank comes from the {BANK_SPLIT} split, whose annotation "
             f"files are not in {params.anno_path}")
        return None
    device = device or model.device
    captions, available = bank_captions(params)
    key = {"version": CACHE_VERSION, "split": "qbnorm-bank", "weights": weights_fingerprint(model),
           "captions": hashlib.sha256("\n".join(captions).encode()).hexdigest(), "max_words": params.max_words,
           "precision": str(autocast_dtype(device, params.precision) or torch.float32)}
    path = cache_path(params, key)
    if cache and path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["key"] == key:
                return QueryBank(stored["text"], BANK_SPLIT, available)
        except Exception as error:  # noqa: BLE001 - a broken cache file is re-made
            note(f"feature cache {path} is unreadable ({error}); encoding again")
    text = encode_captions(model.eval(), captions, params, device, desc="encode the QB-Norm bank")   # [B, D]
    if cache:
        atomic_torch_save({"key": key, "text": text}, path)
    return QueryBank(text, BANK_SPLIT, available)
