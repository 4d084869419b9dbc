"""mlmesh LLM service."""
