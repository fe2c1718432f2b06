"""blockcache exporter: models with their weights, the eager reference, tracing, graph surgery, plan
export, TensorRT engines, verification, the schedule makers that run a network, and the CLIs."""
