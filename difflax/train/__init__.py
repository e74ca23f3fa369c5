"""Training: state, optimizer, the pure train step, sharding, Orbax checkpoints and the loop."""

from difflax.train.checkpoint import Checkpointer, CheckpointError
from difflax.train.loop import Trainer, train_and_evaluate
from difflax.train.optim import make_optimizer
from difflax.train.sharding import make_mesh, shard_batch
from difflax.train.state import TrainState
from difflax.train.step import make_train_step

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "TrainState",
    "Trainer",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "shard_batch",
    "train_and_evaluate",
]
