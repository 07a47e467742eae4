"""The model library: EMCL-Net on CLIP, its loss, its similarity and its metrics.

It imports torch, numpy and clip-anytorch, and nothing of the experiment app around it (run
parameters, data, training, evaluation, notebooks), so it can be used and tested alone:

    from emcl_nb.model.config import ModelConfig
    from emcl_nb.model.emclnet import create_model
    from emcl_nb.model.loss import EMCLLoss
    model = create_model(ModelConfig(...))                 # or emcl_nb.load(checkpoint)
    text, video, frame_mask = model(batch)                 # features of a batch
    loss = EMCLLoss()(model, text, video, frame_mask)      # symmetric InfoNCE (all processes)

`similarity.similarity_matrix` scores a test set by the evaluation's blocks, `metrics` turns a
matrix into R@K, MdR and MnR (ties never help). This file imports nothing, so that the
torch-free `clip_files` (where CLIP's weights files are) can be read before torch loads.
"""
