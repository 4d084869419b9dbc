"""mlmesh_registry."""
