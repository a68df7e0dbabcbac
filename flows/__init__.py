"""Prefect flows, MLflow tracking and the `rae` command line around rae_core."""
