"""edgert: an edge LLM inference runtime.

Paged KV cache, continuous batching, ONNX Runtime / TensorRT backends, a Unix-socket server.
"""

__version__ = "0.1.0"
