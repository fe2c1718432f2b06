"""Schedule makers that run the network (`blockcache-schedule analyze`, `learn-l2c`, `scale-shift`):
Block Caching's change analysis, a Learning-to-Cache router learner, and Block Caching's scale-shift
by distillation. The makers that need no network live in `schedules`."""
