"""What the scheduler side and the worker side agree on, and nothing else.

- :mod:`.jobs`: the per-step messages (``StepPlan`` out, ``CompactionResult`` back) and the geometry of a
  compaction (``CompactionLayout``);
- :mod:`.kv_spec`: the KV-cache spec the attention backends report for their layers, which selects the
  scheduler's block manager;
- :mod:`.class_paths`: the dotted paths the front end hands to vLLM (scheduler, workers, attention
  backends, request validator).

It imports nothing of the engine, the workers, the attention backends or the front end (a unit test
checks the import graph), so every side can depend on it and none on another through it.
"""
