"""The `h2t` command: local training, the demo, and (later) the service entry points."""
