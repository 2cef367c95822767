"""circe: composed image retrieval (reference image + modification text -> gallery images)."""

__version__ = "0.1.0"
