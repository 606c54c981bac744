"""Data pipeline: datasets, multi-crop transforms, mask generators, collate."""
