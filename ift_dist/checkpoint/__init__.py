"""Checkpoints of a training run, one module per concern (docs/checkpoints.md):

    run_dir       every path of a run and of its checkpoints (RunDir); the one rule for a path a user gives
    atomic        durable writes: fsync, SHA-256, atomic replace
    protocol      the commit protocol: files described, marker then `latest`, verify, marker-first deletion, retention
    checkpointer  save and restore on every rank: engine shards, named per-rank components, train progress
    collective    how the ranks agree: every rank's value on every rank
    state         the components besides the engine: Progress (train_state.json), RandomState, LoaderState
    discovery     which checkpoint a run resumes from (and which one `ift export` reads)
    compat        which config changes a resume allows
    universal     DeepSpeed's universal version of a checkpoint, for a resume on another world size
    save_policy   when to save and whether to stop: cadence, stop signals, deadline
    faults        test-only fault injection (IFT_TEST_FAULT)

Nothing here imports DeepSpeed: the engine comes in as an adapter (engine.EngineShards) and a converter function.
This file imports only torch-free modules, so `RunDir` is usable where torch is not installed (the launcher).
"""

from ift_dist.checkpoint.protocol import CheckpointError, verify
from ift_dist.checkpoint.run_dir import RunDir

__all__ = ["CheckpointError", "RunDir", "verify"]
