"""One decision per step, agreed by every rank: pure functions, no torch, no Ray.

Right after each optimizer step every rank packs what it alone knows into a control vector; one
all-reduce (sum) of that vector is the step's only collective of our own. Every rank then derives
the same :class:`StepPlan` from the same reduced numbers, so a save, an evaluation or a stop (all of
which are collective) happens on every rank or on none, even when the ranks' own views differ: one
rank heard of a preemption before another, or only rank 0 looked at the clock or at the cluster.

Agreeing after the step (not before the next) is what bounds a preemption's cost: a notice heard
while step ``s`` runs is acted on when ``s`` ends, so notice -> snapshot is the detection delay plus
the rest of the running step, never a further whole step (nor a validation: a preemption's save
comes first).

    slot     who sets it                         what the ranks do when the sum is > 0
    weight   every rank: its share's loss weight  (the next step's global loss weight: sum)
             in the next step's batch
    notice   a rank that heard of a preemption    checkpoint once (reason "preemption")
    room     rank 0, every elastic_resize_check_s checkpoint (reason "grow"), at most
             when the cluster can hold one more   train.max_grow_checkpoints times per group
             worker of an elastic run
    clock    rank 0, checkpoint_every_minutes     checkpoint (reason "time")
    stop     a rank whose loss is not finite      stop after this step, loudly, without saving
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

SLOTS = ("weight", "notice", "room", "clock", "stop")


@dataclass(frozen=True)
class Signals:
    """What one rank knows after a step (or, reduced, what the ranks know together)."""

    weight: float = 0.0
    notice: float = 0.0
    room: float = 0.0
    clock: float = 0.0
    stop: float = 0.0

    def vector(self) -> list[float]:
        return [float(getattr(self, slot)) for slot in SLOTS]

    @classmethod
    def from_vector(cls, values) -> "Signals":
        return cls(**dict(zip(SLOTS, (float(v) for v in values))))


@dataclass(frozen=True)
class Cadence:
    """The step counts that decide logging, evaluation and checkpoints (the same on every rank)."""

    total_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    max_grow_checkpoints: int


@dataclass(frozen=True)
class ControlState:
    """What earlier decisions of this worker group leave behind (the same on every rank)."""

    notice_checkpointed: bool = False
    grow_checkpoints: int = 0


@dataclass(frozen=True)
class StepPlan:
    global_weight: float  # of the next step's global batch
    stop: Optional[str] = None  # stop now (after the step), with this cause; nothing is saved
    checkpoint: Optional[str] = None  # checkpoint after the step, for this reason
    evaluate: bool = False
    log: bool = False

    @property
    def reports(self) -> bool:
        return self.log or self.evaluate or self.checkpoint is not None


def plan_step(agreed: Signals, step: int, cadence: Cadence, state: ControlState) -> tuple[StepPlan, ControlState]:
    """What follows global step ``step`` (0-based, just trained) from the reduced control vector."""
    if agreed.stop > 0:
        cause = (f"the training loss is not finite (nan or inf) at step {step + 1}: the run diverged "
                 "(lower train.lr, raise train.warmup_steps, or use fp16/bf16 loss scaling)")
        return StepPlan(global_weight=agreed.weight or 1.0, stop=cause), state
    done = step + 1
    end = done == cadence.total_steps
    reason = None
    if agreed.notice > 0 and not state.notice_checkpointed:
        reason, state = "preemption", replace(state, notice_checkpointed=True)
    elif agreed.room > 0 and state.grow_checkpoints < cadence.max_grow_checkpoints:
        reason, state = "grow", replace(state, grow_checkpoints=state.grow_checkpoints + 1)
    if end:
        reason = "end"
    elif reason is None and agreed.clock > 0:
        reason = "time"
    elif reason is None and done % cadence.checkpoint_every == 0:
        reason = "steps"
    plan = StepPlan(global_weight=agreed.weight or 1.0, checkpoint=reason,
                    evaluate=end or bool(cadence.eval_every and done % cadence.eval_every == 0),
                    log=end or done % cadence.log_every == 0)
    return plan, state
