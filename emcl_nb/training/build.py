"""The run's model from its parameters: the bridge from `Params` to the model library.

`build_model(params)` builds `emcl_nb.model.create_model(ModelConfig.from_params(params))`
and applies what belongs to the run rather than to the model: where named CLIP weights are
looked up (clip_cache), the frame count the temporal positions must cover (max_frames), the
frozen patch embedding (freeze_patch_embedding) and CLIP's storage dtype (clip_dtype).
"""
from __future__ import annotations

from clip.model import CLIP

from emcl_nb.model.clip_backbone import CONTEXT_LENGTH, convert_to_fp16
from emcl_nb.model.config import ModelConfig
from emcl_nb.model.emclnet import EMCLNet, create_model
from emcl_nb.params import Params


def build_model(params: Params, clip_model: CLIP | None = None) -> EMCLNet:
    """EMCLNet of the run's `ModelConfig` (fp32, CPU; move it afterwards), on `clip_model` or
    the CLIP named by params.clip_weights."""
    config = ModelConfig.from_params(params)
    if config.agg_module == "seqTransf" and params.max_frames > CONTEXT_LENGTH:
        raise ValueError(f"agg_module=seqTransf has {CONTEXT_LENGTH} frame positions; "
                         f"got max_frames={params.max_frames}")
    model = create_model(config, clip_model=clip_model, clip_cache=params.clip_cache)
    if params.freeze_patch_embedding:   # the reference freezes CLIP's patch embedding
        model.clip.visual.conv1.requires_grad_(False)
    if params.clip_dtype == "fp16":     # the reference's fp16 CLIP (docs/reference-recipe.md)
        convert_to_fp16(model.clip)
    return model
