"""`minit2i train`: config (the run's sections), driver (checks, TorchTrainer), loop (per worker),
step (DeepSpeed step and EMA, no Ray), data (sample order and Ray Data ingest), checkpoints
(folders and where weights are found), tracking (console, TensorBoard, W&B, MLflow)."""
