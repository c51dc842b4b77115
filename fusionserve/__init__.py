"""fusionserve: gRPC serving for multimodal (image + text) fusion models on onnxruntime."""

__version__ = "0.1.0"
