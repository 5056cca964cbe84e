"""The project's benchmark harnesses (`lease bench ...`) and their records under `benchmarks/results/`.

Measuring code lives here, not in the `lease` core package or the pipeline stages: each module times a
part of the system (training steps, numerics, torchrun, tokenizers, the precompute sub-flow, k-means,
assignment, generation, k-NN) and writes a JSON record through `benchmarks.records`.
"""
