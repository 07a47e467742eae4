"""emcl-nb: EMCL-Net for text-video retrieval on CLIP, as a package the notebooks call.

The public face, as `clip` has one (emcl_nb/retrieval/trained.py):

    import emcl_nb
    emcl_nb.available_models()                  # runs with checkpoints under outputs/
    model = emcl_nb.load("synthetic/default")      # or a run folder, or a checkpoint file
    model.score(model.encode_text(["a red circle moves left"]), model.encode_videos(paths))

What lives where:

    emcl_nb/model/       the model library (CLIP backbone, EMCL, EMCL-Net, loss, similarity,
                         metrics): torch and clip only, none of the run machinery
    emcl_nb/data/        annotations, videos, transforms, datasets, frame cache, synthetic set
    emcl_nb/training/    engine, optimiser, checkpoints, distributed, runtime
    emcl_nb/evaluation/  encoding, scoring, validation, a run's evaluation
    emcl_nb/retrieval/   a trained model in use: load, encoders, the video index of search
    emcl_nb/analysis/    ablations, statistics, EM analysis and figures, demo, README sections
    params.py, io.py, progress.py, notebook.py: run parameters, safe files, progress, notebooks
    train.py, evaluate.py, search.py, demo.py, ablations.py: the commands
    (`python -m emcl_nb.<command>`)

`import emcl_nb` imports no torch: the public names are imported on first use (PEP 562), so
a command can check its inputs before torch loads.
"""
import warnings

# clip-anytorch imports pkg_resources (hence the setuptools<82 pin); its deprecation
# warning says nothing actionable to a user of this package.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

__all__ = ["TrainedModel", "VideoFeatures", "available_models", "load", "tokenize"]


def __getattr__(name: str):
    """The public names, imported from their modules on first use."""
    if name == "tokenize":
        # Imported here, not at the top: the import costs torch's (seconds), which
        # `import emcl_nb` must not (tests/test_layout.py allows imports in this function only).
        from emcl_nb.data.dataset import tokenize
        return tokenize
    if name in __all__:
        from emcl_nb.retrieval import trained  # the same reason as above
        return getattr(trained, name)
    raise AttributeError(f"module 'emcl_nb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
