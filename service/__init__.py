"""The REST service: settings, SQL store, routers. Serves with onnxruntime; never imports torch."""
