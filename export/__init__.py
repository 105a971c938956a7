"""eproj.export: ONNX graphs and TensorRT engines built from trained models."""
