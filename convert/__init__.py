"""HF <-> glm-jax checkpoint conversion."""
