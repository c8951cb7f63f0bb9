"""Scoring: the fused log-probability engine, data formats, request rendering, demonstration choice, ICA scores,
weighting schemes, and the distributed helpers they share."""
