"""emcl-nb: EMCL-Net for text-video retrieval on CLIP, as a package the notebooks call."""
import warnings

# clip-anytorch imports pkg_resources (hence the setuptools<82 pin); its deprecation
# warning says nothing actionable to a user of this package.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
