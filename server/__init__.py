"""The serving side: one core (registry, batcher, pipeline) behind thin gRPC front-ends; never imports TensorFlow."""
