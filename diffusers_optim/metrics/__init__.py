"""Metrics: timestep buckets (`metrics.buckets`), optimizer statistics, sample quality (`metrics.quality`).

Deliberately empty: import the submodule you need, so `import diffusers_optim.metrics` stays light.
"""
