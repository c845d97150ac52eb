"""The test suite: unit/ (no services), integration/ (real Kafka and PostgreSQL), faults/ (services or
daemons killed and restarted on purpose), and support/ (the helpers and the pipeline harness)."""
