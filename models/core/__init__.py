"""The torch training core: data, backbones, H2T fusion, stage recipes, the training loop, ONNX export."""
