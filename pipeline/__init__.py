"""Compare freezing strategies for VGG16 transfer learning: prepare -> tune -> train -> report.

The folders are the roles (README "Development"): `stages/` (what dvc.yaml runs), `core/` (the
science: params, data, the network, training, statistics), `analysis/` (results into answers),
`stack/` (MLflow, Optuna, the team's servers), `runtime/` (how a process runs: command line,
errors, atomic writes, the log filter), `tools/` (commands for people: compare runs, benchmarks).
"""
