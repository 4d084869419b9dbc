"""mlmesh_chassis."""
