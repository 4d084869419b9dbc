"""mlmesh monitor: model quality and drift after release."""
