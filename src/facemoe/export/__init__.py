"""Export: ONNX (fp32 / fp16 / int8), graph checks, TensorRT engines, the bundle writer and parity."""
