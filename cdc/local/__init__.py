"""Local services without Docker (PostgreSQL, Kafka, Prometheus), the demo and the daemon runner."""
