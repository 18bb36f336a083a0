"""The Ray Data pipeline: planner and runner over sources, the worker stages and sinks."""
