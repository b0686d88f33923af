"""Metrics: timestep buckets (`metrics.buckets`), training metrics of the loop (`metrics.train`), per-timestep
gradient probes (`metrics.probes`), sample quality (`metrics.quality`), key names (`metrics.keys`).

Deliberately empty: import the submodule you need, so `import diffusers_optim.metrics` stays light.
"""
