"""The vector service (mlmesh.vectors.v1)."""
