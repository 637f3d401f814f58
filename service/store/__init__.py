"""What the API, the workers and the migrations run on: settings, SQL store, run state machine, queue, sweep."""
