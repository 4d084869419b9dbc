"""mlmesh_runner."""
