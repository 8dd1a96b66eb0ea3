"""Results into answers: the recommendation rule, the compute cost, the cheap predictors.

Imports `core` and `runtime`; builds no network for training.
"""
