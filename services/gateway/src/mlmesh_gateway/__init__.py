"""The mlmesh ML gateway."""
