"""The time-budget planner: how many steps fit in what is left of a wall-clock budget, and how often to evaluate.

The engine times its steps (at unit `step_cost`: progressive resizing makes late steps dearer), then lays the
schedule over the steps that fit: `plan["total"]` (and, the first time, its warm-up) after the first steps, again
after every epoch at the machine's current speed, the cosine going on from where it stands (`plan["anchor"]`). The
plan is saved in `last.state.pt`, so a resumed run keeps it.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, List

from .optim import cosine_progress

log = logging.getLogger(__name__)

EVAL_SHARE = 0.03  # under a time budget, evaluations get about this share of the training time (eval_every=None)
FIRST_STEPS = 5  # steps timed before the first plan; the first two (warm-up, allocation) are left out of it
# the final evaluation is kept in the budget at this multiple of the last one measured (and more where the steps have
# slowed since): a 60-minute CIFAR-10 run's last evaluation took 1.26x the one before it, and its command ended 6 s late
FINAL_EVAL_MARGIN = 1.2


def median(xs: List[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else 0.0


def first_speed(step_times: List[float]) -> float:
    """Seconds per step (at unit cost) for the first plan, leaving out the first steps' one-off costs."""
    return median(step_times[2:])


def current_speed(step_times: List[float]) -> float:
    """Seconds per step (at unit cost) of the last 50 steps: the machine's speed now (it can change mid-run)."""
    return median(step_times[2:][-50:] or step_times)


def final_eval_scale(speed_now: float, speed_then) -> float:
    """What the last measured evaluation is multiplied by to keep room for the final one: FINAL_EVAL_MARGIN, times
    how much slower a step runs now than when it was measured (seconds per step now / then; never below 1)."""
    return FINAL_EVAL_MARGIN * (max(1.0, speed_now / speed_then) if speed_then else 1.0)


def guess_eval_secs(step_times: List[float], num_val: int, images_per_step: int, views: int = 1) -> float:
    """Before the first evaluation: forward-only ≈ a third of a training step per image and test-time view, plus
    a save."""
    per_img = median(step_times) / max(1, images_per_step)
    return num_val * views * per_img / 3 + 0.5


def eval_every_for(eval_secs: float, epoch_secs: float) -> int:
    """Epochs between evaluations so that evaluating costs about EVAL_SHARE of the training time (a held-out pass
    can cost a seventh of an epoch: that is a seventh of the budget not spent training)."""
    n = max(1, math.ceil(eval_secs / max(1e-9, EVAL_SHARE * epoch_secs)))
    if n > 1:
        log.info("evaluating every %d epochs and at the end: an evaluation takes %.1f s, an epoch %.1f s "
                 "(--eval-every sets it)", n, eval_secs, epoch_secs)
    return n


def fit_steps(step: int, seconds: float, sec_per_step: float, per_step_extra: float,
              step_cost: Callable[[float], float]) -> int:
    """The largest total T >= step such that steps step..T-1, each costing sec_per_step * step_cost(s / T) plus
    per_step_extra, fit in `seconds` (the cost of a step depends on where it falls in a schedule of length T)."""
    def need(total: int) -> float:
        if total <= step:
            return 0.0
        n = total - step
        stride = max(1, n // 256)  # sample the cost curve: it changes a handful of times (progressive resizing)
        samples = [step_cost(s / total) for s in range(step, total, stride)]
        return n * (sec_per_step * sum(samples) / len(samples) + per_step_extra)

    unit = sec_per_step * min(step_cost(p / 10) for p in range(11)) + per_step_extra
    lo, hi = step, step + int(seconds / max(unit, 1e-9)) + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= seconds:
            lo = mid
        else:
            hi = mid - 1
    return lo


def replan(plan: dict, *, step: int, seconds: float, sec_per_step: float, per_step_extra: float,
           steps_per_epoch: int, step_cost: Callable[[float], float], warmup_steps: Callable[[int], int]) -> None:
    """Set `plan`'s total steps so that the steps from `step` on fit in `seconds`; the first time, its warm-up too
    (`warmup_steps(total)`), unless it is a resumed run's, which is past its warm-up."""
    total = max(fit_steps(step, max(0.0, seconds), sec_per_step, per_step_extra, step_cost), step + 1)
    if not plan.get("planned"):
        if not plan.pop("keep_warmup", False):
            plan["warmup"] = warmup_steps(total)
        plan["planned"] = True
    elif total != plan["total"] and step > plan["warmup"]:
        # past warm-up, a new total goes on from where the cosine stands (stretching it would raise the lr again)
        plan["anchor"] = [step, cosine_progress(step, plan["total"], plan["warmup"], plan.get("anchor"))]
    plan["total"] = total
    plan["epochs"] = round(plan["total"] / steps_per_epoch, 2)


def replan_resumed(plan: dict, *, step: int, elapsed: float, seconds: float) -> None:
    """A resumed run given a new budget: its total from the speed of the run so far, to be planned again once this
    process has timed its own steps; it keeps its warm-up (it is past it)."""
    per_step = elapsed / max(1, step)
    plan.pop("anchor", None)  # the new budget's cosine is laid from this step over the new total, as --epochs does
    plan.update(total=step + max(1, int((seconds - elapsed) / max(per_step, 1e-9))), planned=False, keep_warmup=True)
