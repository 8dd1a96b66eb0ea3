"""Adapters to the stack: MLflow (tracking, serving), Optuna (storage, a study's files) and the
team's servers (PostgreSQL, an MLflow server, a DVC remote)."""
