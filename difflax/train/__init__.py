"""Training: state, optimizer, the pure train step, sharding, Orbax checkpoints and the loop."""

from difflax.train.checkpoint import Checkpointer, CheckpointError, NonFiniteStateError
from difflax.train.config_checks import ConfigError, check_config
from difflax.train.loop import Trainer, TrainingDiverged, train_and_evaluate
from difflax.train.optim import make_optimizer
from difflax.train.preemption import Preemption
from difflax.train.sharding import make_mesh, shard_batch
from difflax.train.state import TrainState
from difflax.train.step import make_train_step
from difflax.train.workdir import RecipeMismatch, WorkdirBusy, WorkdirLock

#: The errors a training job reports in one line and exits non-zero with.
JOB_ERRORS = (ConfigError, CheckpointError, RecipeMismatch, TrainingDiverged, WorkdirBusy)

__all__ = [
    "JOB_ERRORS",
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "NonFiniteStateError",
    "Preemption",
    "RecipeMismatch",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "WorkdirBusy",
    "WorkdirLock",
    "check_config",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "shard_batch",
    "train_and_evaluate",
]
