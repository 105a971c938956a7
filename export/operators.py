"""The ONNX operators exported graphs may use: standard ones that TensorRT's ONNX parser supports.

Every exported graph is checked against this set at export time and in the tests.
"""

ALLOWED_OPS = frozenset({
    # arithmetic and activations
    "Add", "Sub", "Mul", "Div", "Reciprocal", "Neg", "Exp", "Log", "Sqrt", "Pow", "Sigmoid", "LeakyRelu", "Relu", "Clip",
    # convolutions and products
    "Conv", "ConvTranspose", "MatMul", "Gemm",
    # shapes and constants
    "Constant", "ConstantOfShape", "Shape", "Reshape", "Transpose", "Concat", "Slice", "Split", "Gather",
    "Unsqueeze", "Squeeze", "Flatten", "Expand", "Identity", "Cast",
    # reductions and selection
    "ReduceSum", "ReduceMean", "Greater", "Less", "Where",
    # elementwise maximum (the U-Net's 2x2 max-pooling, written as the Max of four strided Slices)
    "Max",
})
