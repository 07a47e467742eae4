"""The model's own small configuration: what EMCLNet is built from, apart from the run.

`ModelConfig.from_params(params)` picks it out of the run parameters (the fields tagged
MODEL, plus `seed`, which draws the initial EMCL bases; same names, defaults stated once, in
Params); checkpoints store it as `model_config` beside the run's parameters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    # ---- CLIP ----
    clip_weights: str           # ViT-B/32 | ViT-B/16 | ViT-L/14 | tiny | path/to/weights.pt
    tiny_width: int             # tiny CLIP: transformer width (= embedding dim)
    tiny_layers: int            # tiny CLIP: layers of each tower
    tiny_patch: int             # tiny CLIP: ViT patch size
    image_size: int             # frame side fed to CLIP
    # ---- aggregation and pooling ----
    agg_module: str             # None | seqLSTM | seqTransf
    num_hidden_layers: int      # temporal transformer depth
    temporal_ln_eps: float      # eps of the temporal transformer's LayerNorms (reference: 1e-12)
    pooling: str                # text (text-conditioned frame weights) | mean (CLIP4Clip meanP)
    temp: float                 # text-conditioned pooling temperature
    # ---- EMCL ----
    emcl: str                   # on (train + eval) | off (no EMCL) | inference (eval only)
    emcl_bases: int             # K
    emcl_stages: int            # EM iterations
    emcl_momentum: float
    emcl_lamd: float
    emcl_beta: float
    emcl_init: str              # reference (±1 constants) | distinct (K distinct bases)
    seed: int                   # draws the initial EMCL bases (the run's seed)

    @classmethod
    def from_params(cls, params) -> ModelConfig:
        """The model part of a `Params`."""
        return cls(**{f.name: getattr(params, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
