"""File readers below the models: PyTorch pickles and safetensors (`torch_files`)."""
