"""Code every benchmark shares: the results store, the model and LoRA presets, the data, the evaluation."""
