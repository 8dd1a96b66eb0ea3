"""How a pipeline process runs: its command line and exit status, errors, atomic writes, the
TensorFlow log filter, and which source files a stage's outputs depend on. Nothing here changes a
result."""
