"""glm-jax: GLM-4-9B in JAX/Flax."""
