"""headrace runtime: HOW a job runs (state backends, checkpoints, Kafka, workers)."""
