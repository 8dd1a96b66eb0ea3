"""Commands for people, not stages: compare two runs, describe the strategies, benchmarks.

Like a stage, a tool run from the terminal gets TensorFlow's start-up noise filtered
(pipeline/runtime/quiet.py), installed here before any tool imports TensorFlow.
"""

from pipeline.runtime import quiet

quiet.install()
