"""The pipeline's stages, one module each, run by dvc.yaml as `python -m pipeline.stages.<name>`.

A stage reads params and its input files, calls the core, and writes its declared outputs; stages
talk to each other only through those files, never by importing each other.

Starting a stage quiets TensorFlow's start-up noise (pipeline/runtime/quiet.py): the filter is
installed here, before any stage module imports TensorFlow, so only a process that runs a stage
(or imports one) gets it.
"""

from pipeline.runtime import quiet

quiet.install()
