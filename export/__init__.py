"""Host-side export pipeline: HF checkpoint or GGUF -> paged-KV ONNX graph -> model bundle."""
