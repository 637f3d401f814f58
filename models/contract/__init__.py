"""The torch-free contract layer: what the API, the store, the worker, the CLI and the trainer agree on."""
