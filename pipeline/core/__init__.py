"""The science: params, data, the VGG16 network and its cuts, training, evaluation, statistics.

Imports only `runtime` and third-party libraries: never a stage, never MLflow or Optuna.
"""
