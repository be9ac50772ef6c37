"""Metrics that judge generated images; each module is usable alone, from `minit2i eval` and from Tune.

world      exact prompt following on the synthetic world (colour, count, position, shape)
artifacts  patch-boundary artifact ratio
fid        FID on pytorch-fid's Inception (COCO FID-30K captions, reference statistics), or FD on a backbone
clip_score CLIP score with a user-provided CLIP
geneval    GenEval's metadata and official decision rules, CLIP colour judge
mask2former  GenEval's detector: transformers Mask2Former run with mmdetection's pre/post-processing
mmdet_mask2former  the official mmdetection checkpoint -> transformers Mask2Former
dpg        DPG-Bench (ELLA's CSV or the nested Parquet), the dependency rule, a VQA judge
"""
