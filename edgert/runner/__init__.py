"""Where the graph runs: the paged-KV calling convention (step inputs), the KV pool, the ONNX
Runtime backend, and the runner that turns a step's plan into backend calls. A new backend
(CUDA, TensorRT) drops in here."""
