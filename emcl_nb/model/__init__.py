"""The model library: EMCL-Net on CLIP, its loss, its similarity and its metrics.

It imports torch, numpy and clip-anytorch, and nothing of the experiment app around it (run
parameters, data, training, evaluation, notebooks), so it can be used and tested alone:

    model = create_model(ModelConfig(...))                 # or emcl_nb.load(checkpoint)
    text, video, frame_mask = model(batch)                 # features of a batch
    loss = EMCLLoss()(model, text, video, frame_mask)      # symmetric InfoNCE (all processes)
    sims = similarity_matrix(...)                          # the evaluation's block protocol
    retrieval_metrics(sims)                                # R@K, MdR, MnR (ties never help)
"""
from emcl_nb.model.clip_backbone import load_clip_model
from emcl_nb.model.config import ModelConfig
from emcl_nb.model.emcl import EMCL
from emcl_nb.model.emclnet import EMCLNet, create_model
from emcl_nb.model.loss import EMCLLoss, gather_features, symmetric_infonce
from emcl_nb.model.metrics import evaluate_similarity, multi_sentence_metrics, retrieval_metrics
from emcl_nb.model.similarity import similarity_matrix

__all__ = ["EMCL", "EMCLLoss", "EMCLNet", "ModelConfig", "create_model", "evaluate_similarity",
           "gather_features", "load_clip_model", "multi_sentence_metrics", "retrieval_metrics",
           "similarity_matrix", "symmetric_infonce"]
