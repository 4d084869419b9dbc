"""mlmesh_sdk."""
