"""Metrics that judge generated images; each module is usable alone, from `minit2i eval` and from Tune.

world      exact prompt following on the synthetic world (colour, count, position, shape)
artifacts  patch-boundary artifact ratio
fid        Frechet distance on features of a user-provided vision backbone
clip_score CLIP score with a user-provided CLIP
geneval    GenEval runner (prompt metadata + a detector from a user path)
dpg        DPG-Bench runner (prompts + questions + a VQA model from a user path)
"""
