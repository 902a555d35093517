"""Worlds: environments, episode data, the model run as a world, and its evaluation.

- ``envs/``: one adapter per environment family (``make_adapter(env_id)``): observation
  fields, action set, how to make a fresh environment; MiniGrid/BabyAI today.
- ``data/``: the ``Episode`` record and npz shards (``episodes``, documented in
  ``docs/episodes.md``), bot collection (``collect``), DAgger collection (``onpolicy``), and the
  packed training rows (``packing``).
- ``stream.py``: the stream layout (episode <-> tokens); ``task.py``: the world recipe's task.
- ``rollout/``: the model run forward: ``runner`` (cached batched streams), ``agent`` (acting in
  real environments), ``imagine`` (the model as a gymnasium environment), ``plan`` (planning in
  imagination).
- ``eval/``: teacher-forced ``metrics`` and the run's ``report``.
- ``pipeline.py``: collect -> train -> evaluate -> report.

This package imports nothing heavy; import the submodules you need.
"""
