"""jaxmp: model parallelism (data, tensor, layer-wise, pipeline) for JAX/XLA and Flax NNX."""
