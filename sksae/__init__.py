"""sksae: sparse autoencoders and GPU dictionary learning as scikit-learn estimators."""

__version__ = "0.1.0"
