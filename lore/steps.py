"""What a training step reads and how steps are run: the pair rows in either form, the custom
autograd of a step's scores (one read of the rows forward, one backward), Adam, and the loop (a
CUDA graph on GPU). utils.py's models call these; the method itself (the loss, the models, their
fits) stays there.

Two forms of the rows a step reads. Pair form: X [P, F], the difference rows of the pairs. Table
form: X [E', F], the rows of the embedding table that the pairs use, and each pair's chosen and
rejected row in it, so that x_p = X[chosen_p] - X[rejected_p] is never built: a step reads E' rows
instead of P, which is what makes many users rating the same responses cheap. On the CPU, a
table-form LoRe step's pair work (gather, margin, loss, gradient, scatter) is one fused pass
(lore.fused, fused_nll): pairs sorted by user keep their users as offsets and their rows as int32,
and LoRe.fit takes them in bands of table rows where the rows outgrow a core's cache (banded)."""
from dataclasses import dataclass, replace

import torch
import torch.optim as optim
from tqdm.auto import tqdm

from lore import fused
from lore.checks import InputError
from lore.distributed import sum_over_shards
from lore.methods import TEMPERATURE, LossCurve, user_margins
from lore.pairs import index_dtype, project_rows



@dataclass
class TrainingRows:
    """What a training step reads: pair form (X [P, F], chosen None) or table form (X [E', F] and
    the pairs' rows in it)."""
    X: torch.Tensor
    chosen: torch.Tensor = None            # [P] int32 rows of X (table form only)
    rejected: torch.Tensor = None          # [P]
    shard: bool = False                    # one torchrun rank's pairs: V's data gradient is summed across ranks
    offsets: torch.Tensor = None           # [N + 1] user u's pairs offsets[u]:offsets[u+1] (table form, sorted users),
                                           # or [B, N + 1]: banded (fused_nll's alone, banded())
    last_band: torch.Tensor = None         # [N] uint8 each user's last band with pairs (banded rows)

    @property
    def banded(self):
        return self.offsets is not None and self.offsets.dim() == 2

    def project(self, V):
        """-> x_p^T V [P, K]."""
        if self.banded:
            raise ValueError("banded rows are in band order, not the users': fused_nll's only")
        if self.chosen is None:
            return project_rows(self.X, V)                                         # [P, K]
        Z = project_table(self.X, V)                                               # [E', K]
        return Z.index_select(0, self.chosen) - Z.index_select(0, self.rejected)  # [P, K]

    def grad_V(self, g, W, user):
        """d/dV of sum_p g_p x_p^T V w_user(p) -> [F, K], one streaming read of X; summed over the
        torchrun ranks for a shard (the regularizer's gradient, the same on every rank, is not)."""
        return sum_over_shards(self._grad_V(g, W, user), self.shard)

    def _grad_V(self, g, W, user):
        if self.banded:
            raise ValueError("banded rows are in band order, not the users': fused_nll's only")
        if self.chosen is not None:
            # dV = X^T G with G [E', K] the per-row sums of the pairs' g_p w_user(p): + on the
            # chosen row, - on the rejected one (index_add, no loop)
            Gp = g[:, None] * W.index_select(0, user)                              # [P, K]
            G = torch.zeros(len(self.X), Gp.shape[1], device=Gp.device, dtype=Gp.dtype)
            G.index_add_(0, self.chosen, Gp).index_add_(0, self.rejected, Gp, alpha=-1)  # [E', K]
            return table_grad(self.X, G)
        if self.X.is_cuda:
            return self.X.t() @ (g[:, None] * W[user])                             # [F, K]
        # dV = X^T (g * W[user]) = (A X)^T W with A [N, P] holding g_p at (user_p, p): one
        # streaming pass over X. The dense small-K GEMM is ~2x slower on CPU, autograd's
        # default X^T G ~10x.
        A = torch.sparse_coo_tensor(torch.stack([user, torch.arange(len(user), device=user.device)]), g,
                                    (len(W), len(user)), check_invariants=False)
        return (A @ self.X).t() @ W                                                # [F, N] [N, K]


def project_table(X, V):
    """X V [E', K] of table rows X [E', F] (float32, or bfloat16 on the CPU: lore.fused reads them)."""
    return fused.project(X, V) if fused.reads(X) else project_rows(X, V)


def table_grad(X, G):
    """X^T G [F, K] for table rows X [E', F], G [E', K]: lore.fused's one read of X on the CPU, else
    as [K, E'] [E', F] (X^T G is ~10x slower on CPU)."""
    return fused.table_grad(X, G) if fused.reads(X) else (G.t() @ X).t()


def as_rows(X):
    """TrainingRows of X: TrainingRows as they are, a [P, F] tensor as the pair form."""
    return X if isinstance(X, TrainingRows) else TrainingRows(X)


def training_rows(pairs, form=None):
    """The TrainingRows a training step reads for checked Pairs. form: "pairs" (the [P, F]
    difference rows), "table" (the E' table rows the pairs use, float32, with the pairs' indices
    into them; table-form Pairs only) or None: the table form when it reads fewer rows (E' < P), as
    when many users rate the same responses. Both give the same fit up to float rounding."""
    if form not in (None, "pairs", "table"):
        raise InputError(f"form must be 'pairs', 'table' or None, got {form!r}")
    if pairs.X is not None:
        if form == "table":
            raise InputError("form='table' needs table-form Pairs (an embedding table and row indices)")
        return TrainingRows(pairs.X, shard=pairs.shard)
    used, chosen, rejected = pairs.used_rows()                                     # [E'], [P], [P]
    if form == "pairs" or (form is None and len(used) >= len(pairs)):
        return TrainingRows(pairs.rows(), shard=pairs.shard)                       # [P, F]
    # bfloat16 rows stay bfloat16 where lore.fused reads them (as float32, exactly): half the bytes
    keep = pairs.table.dtype == torch.bfloat16 and fused.reads(pairs.table)
    X = torch.cat([pairs.table[idx] if keep else pairs.table[idx].float() for idx in used.split(1 << 15)])  # [E', F]
    small = index_dtype(len(used))   # half the bytes a step reads per pair (no copy where they are int32)
    return TrainingRows(X, chosen.to(small), rejected.to(small), shard=pairs.shard, offsets=pairs.offsets())


def banded(rows, K):
    """Table-form rows with sorted users, for fused_nll at rank K: their pairs in the bands of table
    rows that lore.fused.bands finds for E' rows (a band's T = X V and its gradient G fit a core's
    cache), band after band, as lore.fused.band_pairs orders them (new index tensors, 2 x 4 bytes a
    pair; at 10^6 users, ~0.7 s once); the rows as they are where one band holds them all."""
    B = fused.bands(len(rows.X), K)
    if B == 1:
        return rows
    chosen, rejected, offsets, last = fused.band_pairs(rows.chosen, rows.rejected, rows.offsets, len(rows.X), B)
    return replace(rows, chosen=chosen, rejected=rejected, offsets=offsets, last_band=last)


def user_scores(X, V, W, user, Z=None):
    """user_margins(X V, W, user) -> [P], differentiable in V and W, reading X once forward and
    once backward. X: the pair rows [P, F] or TrainingRows (either form). Z: X V when it is already
    computed for this very V (skips the forward read)."""
    return _UserScores.apply(as_rows(X), V, W, user, Z)


class _UserScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, V, W, user, Z):
        Z = rows.project(V) if Z is None else Z                                    # [P, K]
        ctx.rows = rows
        ctx.save_for_backward(Z, W, user)
        return user_margins(Z, W, user)                                            # [P]

    @staticmethod
    def backward(ctx, g):                                                          # g [P]
        Z, W, user = ctx.saved_tensors
        dV = ctx.rows.grad_V(g, W, user) if ctx.needs_input_grad[1] else None      # [F, K]
        dW = None
        if ctx.needs_input_grad[2]:
            dW = torch.zeros_like(W).index_add_(0, user, g[:, None] * Z)            # [N, K]
        return None, dV, dW, None, None


def fuses(X, V):
    """Whether fused_nll applies: table-form rows with their users sorted, on the CPU, and the
    fused kernel built (lore.fused); elsewhere (CUDA, the pair form) user_scores."""
    return isinstance(X, TrainingRows) and X.offsets is not None and fused.usable(X.X, V)


def fused_nll(X, V, logits, user_weight):
    """sum_p weight_user(p) * -log sigmoid(s_p / TEMPERATURE), s_p = user_margins(X V, simplex(logits),
    user) (utils.bt_nll of user_scores), differentiable in V and in the logits [N, K]: X V once
    forward (the table rows), the pair work in one fused pass that also takes each user's softmax
    and yields the gradients of T = X V and of the logits, X^T G once backward. user_weight [N]:
    the weight of each of a user's pairs (no [P] weights)."""
    return _FusedNLL.apply(X, V, logits, user_weight)


class _FusedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, V, logits, user_weight):
        T = project_table(rows.X, V)                                               # [E', K]
        nll, G, dL = fused.pair_loss(T, logits, rows.chosen, rows.rejected, rows.offsets, user_weight, TEMPERATURE,
                                     last=rows.last_band)
        ctx.rows = rows
        ctx.save_for_backward(G, dL)                                               # [E', K], [N, K]
        return nll.float()

    @staticmethod
    def backward(ctx, g):                                                          # g []
        G, dL = ctx.saved_tensors
        if float(g) != 1.0:   # (a CPU scalar) the loss as a step takes it needs no [N, K] product
            G, dL = G * g, dL * g
        dV = sum_over_shards(table_grad(ctx.rows.X, G), ctx.rows.shard) if ctx.needs_input_grad[1] else None
        return None, dV, dL if ctx.needs_input_grad[2] else None, None


def data_loss(X, nll):
    """A step's data loss for the loss curve: summed over the torchrun ranks when X is one rank's
    shard, so that one process and several record the same curve."""
    return sum_over_shards(nll.detach(), getattr(X, "shard", False))


def adam(params, learning_rate, device, fused=False):
    """Adam, capturable on CUDA (its step count stays on the GPU, as a CUDA graph needs). fused (CPU):
    torch's fused kernel, one pass over each parameter and its two moments instead of ~10: at 10^6
    users, K = 5, ~25 ms a step instead of ~100 (the fused step's Adam, utils.LoRe.fit). It rounds
    differently (1e-6 a step; tests/test_scale.py), so the torch-op steps keep the single-tensor
    Adam and their numbers."""
    if fused and device.type != "cpu":
        raise ValueError(f"adam(fused=True) is the CPU's fused kernel, not {device}'s")
    return optim.Adam(params, lr=learning_rate, capturable=device.type == "cuda", fused=fused or None)


GRAPH_WARMUP = 3   # eager steps on a side stream before a CUDA graph is captured


def training_loop(num_iterations, step, device, desc=None, before=None, stop=None, per_step=1.0, graph=True,
                  windowed=False):
    """Call before(i) then step() for i in range(num_iterations), with a tqdm bar when desc is given;
    step() returns the step's loss tensor, kept at ~100 evenly spaced steps (a LossCurve, collected
    by lore.methods.recording) -> the curve {"step": [...], "loss": [...]}.
    On CUDA the step is captured once as a CUDA graph and replayed: a step is ~100 small kernels
    around two reads of X, and launching them one by one from Python takes longer than running
    them (H100, PersonalLLM scale: LoRe_regularized 2.5 ms -> docs/performance.md). The first steps run
    eagerly on a side stream, as graph capture requires. The captured step's loss tensor is static:
    each replay overwrites it, so the curve copies it right after the replay of a recorded step.
    stop: an EarlyStop (stop="early"): checked every stop.every steps, the loop ends when it says
    so and the best check's parameters are restored; num_iterations is then the cap. per_step: the
    share of the training pairs a step reads (1 full batch), for the passes over the data. graph:
    False for steps that cannot be captured (minibatches drawn on the host). windowed: the curve
    keeps the mean loss between points (minibatch fits). The curve also says steps, passes,
    stopped ("fixed", "early" or "cap") and, with stop, the held-out checks."""
    graphed = graph and device.type == "cuda" and num_iterations > GRAPH_WARMUP
    side, graph, loss = (torch.cuda.Stream(device), None, None) if graphed else (None, None, None)
    # early: the curve's points at the checks (its length is not known in advance)
    at = None if stop is None else range(0, num_iterations, stop.every)
    curve, done = LossCurve(num_iterations, windowed, at), 0
    # a bar on a terminal only (disable=None): in a log, redrawn bars are noise
    for i in tqdm(range(num_iterations), desc=desc, leave=False, disable=True if desc is None else None):
        if before is not None:
            before(i)
        if graph is not None:
            graph.replay()
        elif graphed and i == GRAPH_WARMUP:
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = step()
            graph.replay()
        elif graphed:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                curve.add(i, step())   # the copy on the side stream, after the step that made it
            continue                   # warm-up steps: never a check (i < GRAPH_WARMUP < CHECK_EVERY)
        else:
            loss = step()
        done = i + 1
        # the check reads the parameters after this step; the curve then keeps the step that ended the fit
        ending = stop is not None and (done % stop.every == 0 or done == num_iterations) and stop.check(done, per_step)
        curve.add(i, loss, last=ending)
        if ending:
            break
    done = i + 1 if num_iterations else 0
    stopped = "fixed" if stop is None else "early" if done < num_iterations else "cap"
    if stop is not None:
        stop.restore()
    curve.info = {"steps": done, "passes": done * per_step, "stopped": stopped,
                  "cap": num_iterations if stop is not None else None, **(stop.report() if stop is not None else {})}
    return curve.result()
