"""Models as files and objects: checkpoints on disk (checkpoints: safetensors, sharded
Hugging Face folders, ``.pt`` state dicts), Hugging Face models built offline (hf_model),
calibration inputs (calib_files), and the state-dict helpers every stage shares (tensors)."""
