"""Using a trained model: `emcl_nb.load` and its encoders (trained.py), and text search over a
folder of videos (index.py; the command is `python -m emcl_nb.search`)."""
