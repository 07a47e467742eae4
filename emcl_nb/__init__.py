"""emcl-nb: EMCL-Net for text-video retrieval on CLIP, as a package the notebooks call.

    emcl_nb/model/       the model library (CLIP backbone, EMCL, EMCL-Net, loss, similarity,
                         metrics): torch and clip only, none of the run machinery
    emcl_nb/data/        annotations, videos, transforms, datasets, frame cache, synthetic set
    emcl_nb/training/    engine, optimiser, checkpoints, distributed, runtime
    emcl_nb/evaluation/  encoding, scoring, validation, a run's evaluation
    emcl_nb/analysis/    ablations, statistics, EM analysis and figures, demo, README sections
    params.py, io.py, progress.py, notebook.py: run parameters, safe files, progress, notebooks
    train.py, evaluate.py, demo.py, ablations.py: the commands (`python -m emcl_nb.<command>`)
"""
import warnings

# clip-anytorch imports pkg_resources (hence the setuptools<82 pin); its deprecation
# warning says nothing actionable to a user of this package.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
