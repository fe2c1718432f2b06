"""blockcache exporter: model zoo, checkpoints, eager reference, tracing, graph surgery, plan writing."""
