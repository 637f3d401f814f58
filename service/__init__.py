"""The service: `service.store` (the SQL store, run state machine, queue and settings that the API, the
workers and the migrations run on) and `service.api` (the HTTP API). Neither imports torch."""
