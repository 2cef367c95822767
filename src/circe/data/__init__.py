"""Data sets in one shape: queries, galleries, loaders."""
