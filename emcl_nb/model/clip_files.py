"""Where CLIP's weights files are: the official names, their file names in a cache folder,
and the error that names a missing file and where to get it. No torch here: the commands
check for the files before anything slow loads."""
from __future__ import annotations

from pathlib import Path

# Official weights: name -> download URL (from the release README); the file name is the
# URL's last part (ViT-B-32.pt ...), looked up in `clip_cache`.
OFFICIAL_WEIGHTS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
}
TINY = "tiny"              # no file: a small random CLIP (clip_backbone.build_tiny_clip)


class WeightsNotFoundError(FileNotFoundError):
    """The CLIP weights file is not there; the message names it and how to get it."""


def resolve_weights_path(weights: str, cache_dir: str) -> Path:
    """The file for `weights` (official name -> file in `cache_dir`; anything else is a path)."""
    if weights in OFFICIAL_WEIGHTS:
        url = OFFICIAL_WEIGHTS[weights]
        path = Path(cache_dir).expanduser() / url.rsplit("/", 1)[1]
        if not path.is_file():
            raise WeightsNotFoundError(
                f"CLIP weights {weights!r} not found: expected the file {path}. Nothing is downloaded "
                f"automatically; get it with `wget -P {path.parent} {url}`, or set clip_cache to the "
                f"folder that holds {path.name}, or clip_weights to the path of a .pt file "
                f"(clip_weights=tiny gives a small random CLIP for tests).")
        return path
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"CLIP weights file {path} not found. Set clip_weights to one of "
            f"{', '.join(OFFICIAL_WEIGHTS)} (looked up in clip_cache), to the path of a .pt file "
            f"(official archive or state dict), or to 'tiny'.")
    return path
