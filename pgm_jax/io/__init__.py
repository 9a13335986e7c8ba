"""File formats below the models: PyTorch pickles and safetensors (`torch_files`), and the
reference's PyTorch parameter names of the text models (`torch_names`)."""
