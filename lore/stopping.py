"""The one stopping rule every method's fit can use (stop="early"; the paper's recipes are
stop="fixed", a fixed number of steps): which pairs it holds out, how often it checks, and the
state it keeps; and its form for the few-shot fits (fewshot_stop: fewshot_holdout). lore.steps.training_loop runs it; the methods say what their held-out loss is."""
import math

import torch

from lore.checks import InputError
from lore.distributed import shard_span

# The one stopping rule (stop="early", every method's fit): a random HOLDOUT of every seen user's
# own training pairs is held out; every `every` steps the loss on it is measured; the fit stops
# when it has not improved (by MIN_IMPROVEMENT, relative) for PATIENCE checks in a row AND for
# PATIENCE_PASSES passes over the fit's training pairs, and the parameters of the best check are
# kept. The passes matter for minibatch fits (PAL, VPL): 10 checks of 25 steps are only 1-1.5 passes
# there, and their held-out loss flattens once the shared reward is learnt, before the per-user
# part (PAL's user weights, VPL's latent) is used; full-batch fits (LoRe, the few-shot fits) pass
# over their pairs once a step, so PATIENCE checks are >= 250 passes and the passes never bind. `every` is CHECK_EVERY steps, or more for minibatch fits
# whose held-out slice is larger than what they train on between two checks (checked_every), so
# that a check, forward only, costs at most about a third of the steps between checks.
HOLDOUT = 0.1            # the share of each user's pairs held out (users with < 10 pairs hold none out)
CHECK_EVERY = 25         # steps between two held-out checks, at least
PATIENCE = 10            # checks without improvement before the fit stops
PATIENCE_PASSES = 5      # and passes over the training pairs without improvement (chosen on validation users)
MIN_IMPROVEMENT = 1e-4   # relative: smaller falls of the held-out loss do not count
STOPS = ("fixed", "early")   # the paper's fixed number of steps, or the rule above (the step count its cap)
# The cap of a minibatch fit under the rule (PAL, VPL): its `steps`, or CAP_PASSES passes over its
# training pairs where that is more, so that the cap grows with the data (on the default synthetic
# PersonalLLM, 1,000 users x 47 pairs, VPL's 20,000 steps are 7.4 passes, and it reached them with
# its held-out loss still falling). 20 passes is below 20,000 steps on every population of the size
# table (VPL's 1,000 users there: 17,500 steps), so none of its fits changes.
CAP_PASSES = 20
# The cap of a full-batch fit under the rule (LoRe's iters: lore.compare searches with it, and
# PersonalLLM's recipe sets it): on the synthetic PersonalLLM its fits stop at 300-1,600 steps
FULL_BATCH_CAP = 5000
# The few-shot fits (new users' weights, the shared part fixed; fewshot_stop="early") run the same
# rule on the new users' own few-shot pairs. A user needs 1 / HOLDOUT = 10 pairs to hold one out;
# when no new user has that many (the recipes' 9 shots, a 1-5 shot trial), nothing is held out and
# the fit's own full-batch training loss stands in for the held-out one: a loss-change tolerance
# (it stops when that loss has not fallen by MIN_IMPROVEMENT, relative, below the lowest check so
# far, PATIENCE checks in a row; a training loss on a few separable pairs falls for ever, ever more
# slowly, so the reference is the running lowest, not the best by the tolerance as for held_out,
# whose small falls would add up to an improvement; for a falling loss it is the previous check,
# and a noisy one, PAL's one pair a user a step at a high rate, stops when it sets no new low).
RULES = ("held_out", "train_loss")   # what an early-stopped fit watched
# The few-shot fits' cap under the rule, in passes over their pairs (lore.compare searches with it:
# LoRe's fewshot_iters, full-batch steps; PAL's fewshot_epochs): on the synthetic PersonalLLM
# (K = 3) LoRe's 9-pair fit stops at ~1,250 steps, 20 pairs at ~375, 50 at ~900; PAL's 9-pair fit
# (200 users, K = 6, fewshot_lr 0.022) at ~520 epochs
FEWSHOT_CAP = 2000


def holdout(pairs, fraction=HOLDOUT):
    """-> (train, held): every user's pairs split at random (torch's generator), floor(fraction *
    its pairs) held out; both keep all N users, so that every user's parameters still train. A
    torchrun shard draws the one process's permutation of every rank's pairs and keeps its own
    block of it, so that its users hold out the same pairs as in one process."""
    counts = pairs.counts()                                                        # [N]
    offset, total = shard_span(len(pairs), pairs.shard)
    order = torch.randperm(total)                                                  # [P] a random key
    if pairs.shard:   # this rank's pairs, in the order the permutation visits them
        order = order[(order >= offset) & (order < offset + len(pairs))] - offset
    order = order.to(pairs.device)
    order = order[torch.argsort(pairs.user[order], stable=True)]                   # by user, random within
    start = torch.cumsum(counts, 0) - counts                                       # [N]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(pairs), device=pairs.device) - start[pairs.user[order]]   # [P]
    held = rank < (counts[pairs.user] * fraction).floor().long()                   # [P] bool
    if not held.any():
        raise InputError(f"stop='early' holds out {fraction:.0%} of every user's pairs: no user has "
                         f"{math.ceil(1 / fraction)} or more pairs; use stop='fixed'")
    return pairs.select(~held), pairs.select(held)


def fewshot_holdout(pairs, fraction=HOLDOUT):
    """The few-shot fits' split -> (train, held or None, rule): holdout(pairs) and rule "held_out"
    when some user has 1 / fraction pairs or more (users with fewer train on all of theirs, and
    the others' held-out loss decides when the one joint fit stops); else (pairs, None,
    "train_loss"), the tolerance on the training loss (see RULES)."""
    if int(pairs.counts().max()) * fraction < 1:
        return pairs, None, "train_loss"
    train, held = holdout(pairs, fraction)
    return train, held, "held_out"


def capped(steps, per_pass):
    """An early-stopped minibatch fit's cap: `steps`, or CAP_PASSES passes of per_pass steps each
    when that is more."""
    return max(steps, math.ceil(CAP_PASSES * per_pass))


def checked_every(held, per_step):
    """Steps between two held-out checks: CHECK_EVERY, or the steps it takes to train on as many
    pairs as are held out (per_step: pairs a step trains on), when that is more."""
    return max(CHECK_EVERY, math.ceil(held / per_step))


class EarlyStop:
    """The stopping rule's state: loss() the held-out loss (a scalar tensor, computed without
    gradients), params the tensors kept at the best check and restored at the end."""

    def __init__(self, loss, params, every=None, patience=None, rule="held_out", patience_passes=None):
        if rule not in RULES:
            raise InputError(f"EarlyStop: rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.loss, self.params, self.rule = loss, list(params), rule
        self.every, self.patience = every or CHECK_EVERY, patience or PATIENCE
        self.patience_passes = PATIENCE_PASSES if patience_passes is None else patience_passes
        self.best, self.best_step, self.waited, self.steps, self.losses = math.inf, 0, 0, [], []
        self.improved_at = 0.0   # passes over the training pairs at the last improvement
        self.kept = [p.detach().clone() for p in self.params]

    def check(self, i, per_step=1.0):
        """After i steps (per_step: the share of the training pairs a step reads, 1 full batch):
        measure, keep the parameters if better -> True when the fit should stop: no improvement
        for `patience` checks in a row and for `patience_passes` passes (i * per_step) since the
        last one. held_out: an improvement is a fall below the best check by MIN_IMPROVEMENT
        (relative), and only then are the parameters kept. train_loss (a tolerance on the change):
        an improvement is such a fall below the lowest check so far; the parameters of the lowest
        check are kept."""
        with torch.no_grad():
            value = float(self.loss())
        self.steps.append(i)
        self.losses.append(value)
        ref = self.best   # held_out: the best by the tolerance; train_loss: the lowest check so far
        improved = not math.isfinite(ref) or value < ref - MIN_IMPROVEMENT * abs(ref)
        if improved if self.rule == "held_out" else value < self.best:
            self.best, self.best_step = value, i
            with torch.no_grad():
                for k, p in zip(self.kept, self.params):
                    k.copy_(p)
        if improved:
            self.waited, self.improved_at = 0, i * per_step
            return False
        self.waited += 1
        return self.waited >= self.patience and i * per_step - self.improved_at >= self.patience_passes

    def restore(self):
        with torch.no_grad():
            for k, p in zip(self.kept, self.params):
                p.copy_(k)

    def report(self):
        return {"held_out": {"step": self.steps, "loss": self.losses}, "best_step": self.best_step,
                "every": self.every, "patience": self.patience, "patience_passes": self.patience_passes,
                "rule": self.rule}
