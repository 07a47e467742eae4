"""The model's own small configuration: what EMCLNet is built from, apart from the run.

`ModelConfig.from_params(params)` picks it out of the run parameters (fields of the same
names); checkpoints store it as `model_config` beside the run's parameters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    # ---- CLIP ----
    clip_weights: str = "ViT-B/32"      # ViT-B/32 | ViT-B/16 | ViT-L/14 | tiny | path/to/weights.pt
    tiny_width: int = 128               # tiny CLIP: transformer width (= embedding dim)
    tiny_layers: int = 2                # tiny CLIP: layers of each tower
    tiny_patch: int = 16                # tiny CLIP: ViT patch size
    image_size: int = 224               # frame side fed to CLIP
    # ---- aggregation and pooling ----
    agg_module: str = "seqTransf"       # None | seqLSTM | seqTransf
    num_hidden_layers: int = 4          # temporal transformer depth
    pooling: str = "text"               # text (text-conditioned frame weights) | mean (CLIP4Clip meanP)
    temp: float = 3.0                   # text-conditioned pooling temperature
    # ---- EMCL ----
    emcl: str = "on"                    # on (train + eval) | off (no EMCL) | inference (eval only)
    emcl_bases: int = 32                # K
    emcl_stages: int = 9                # EM iterations
    emcl_momentum: float = 0.9
    emcl_lamd: float = 1.0
    emcl_beta: float = 3.0
    emcl_init: str = "reference"        # reference (±1 constants) | distinct (K distinct bases)
    seed: int = 0                       # draws the initial EMCL bases (the run's seed)

    @classmethod
    def from_params(cls, params) -> ModelConfig:
        """The model part of a `Params`."""
        return cls(**{name: getattr(params, name) for name in MODEL_CONFIG_FIELDS})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


MODEL_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
