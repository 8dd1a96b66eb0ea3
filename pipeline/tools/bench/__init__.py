"""The benchmark (`python -m pipeline.tools.bench`, `__main__.py`): where the time goes. Not a stage.

__main__.py  the command: runs the sections asked for, writes reports/benchmark*.json
measure.py   measurements in this process: dense-math peak, forward pass, fit per strategy, FLOP
             bounds, tune trials per minute, the options that change numerics
scale.py     a large study's feature caches, large images, the end-to-end `dvc repro`
tables.py    reports/benchmark.md from the JSON parts
"""
