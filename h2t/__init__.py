"""The `h2t` command: local training, the demo, and the service processes (API, worker, migrations)."""
