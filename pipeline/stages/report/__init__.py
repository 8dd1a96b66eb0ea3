"""The report stage (`python -m pipeline.stages.report`, `__main__.py`) and the parts of its document.

  __main__.py     the stage: reads the results, decides the answer, writes reports/
  answer.py       the opening: the answer, the reference baselines, the checks behind them
  document.py     tables and caveats as a list of blocks; Markdown and self-contained HTML
  figures.py      convergence, test accuracy, parameter counts, tuning history
  diagnostics.py  weight drift per block and robustness to corrupted inputs
  studies.py      the research studies' sections (sample efficiency, freezing depth)

Reading results goes through `pipeline.core.results`; no module here imports TensorFlow.
"""
