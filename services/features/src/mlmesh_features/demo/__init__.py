"""The demo feature repository (feature_repo.yaml) and its generated data."""
