"""The streaming path: event log, Flink cluster and job, loader into the online store."""
