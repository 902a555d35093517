"""Worlds: environment adapters, the on-disk episode schema and expert data collection.

- ``worldloom.world.envs``: one adapter per environment family (``make_adapter(env_id)``),
  declaring the observation fields, the action set and how to make a fresh environment.
- ``worldloom.world.episodes``: the ``Episode`` record, npz shards and dataset folders
  (documented in ``docs/episodes.md``).
- ``worldloom.world.collect``: ``collect_dataset``, episodes played by minigrid's BabyAI bot,
  optionally perturbed by random actions.

This package imports nothing heavy; import the submodules you need.
"""
