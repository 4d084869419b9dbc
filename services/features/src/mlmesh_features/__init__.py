"""The mlmesh feature store: YAML definitions compiled to Feast objects and
to a batch computation (docs/architecture.md, "Features")."""
