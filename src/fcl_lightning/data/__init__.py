"""Data layer: sources (ACDC, NIfTI manifest, built-in phantom), preprocessing, splits, sampling."""
