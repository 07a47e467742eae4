"""Data: annotation layouts, video reading and frame sampling, transforms, the datasets and
loaders, the decoded-frame cache, compression, the synthetic set and the checks before a run."""
