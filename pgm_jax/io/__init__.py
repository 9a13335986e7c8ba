"""File formats below the models: PyTorch pickles and safetensors (`torch_files`), the
reference's PyTorch parameter names of the text models (`torch_names`), and `hf:` sources on
the Hugging Face Hub resolved to files in its cache (`hub`)."""
