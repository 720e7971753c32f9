"""lwfc converters: model zoo, splitting, edge half to int8 TFLite, cloud half to ONNX."""
