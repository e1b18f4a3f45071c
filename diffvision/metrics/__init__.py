"""Metrics: standard FID (torchmetrics) with offline Inception weights."""
from .fid import build_fid, cache_dir, convert_fid_helper_weights, fid_input, fid_weights_path

__all__ = ["build_fid", "cache_dir", "convert_fid_helper_weights", "fid_input", "fid_weights_path"]
