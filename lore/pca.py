"""A basis in closed form: the top-K principal directions of the seen users' difference rows
x = phi(chosen) - phi(rejected) (as DRMs build theirs), exactly: a dense eigendecomposition
(torch.linalg.eigh, float64) of the [F, F] second moment, accumulated over chunks of pairs so that
the [P, F] rows are never built whole. The method `pca` uses them as a LoRe basis, and the LoRe
entries' init="svd" starts from them.

Why exact and not an iteration: the spectrum of G is flat after its first few eigenvalues on the
data LoRe is for (the synthetic PersonalLLM: 21645, 17945, 13962, 13176, 13031), so a fixed number
of subspace iterations leaves the third direction tens of degrees off. Building G costs P F^2 and
its eigh F^3: seconds at F = 4096.

Which second moment: the uncentered one, each user weighing the same,
    G = sum_i mean_{x in X_i} x x^T          [F, F], summed in float64 over chunks of pairs.
Uncentered, because the mean difference row is itself a direction (one most users like); centering
would remove it. Per user, because a user with many pairs should not own the basis (LoRe's loss
weighs users the same way).

Signs: a principal direction has none, and a LoRe basis is mixed with simplex weights (no weight
can flip a direction), so each direction is oriented so that the seen users' mean margin on it is
>= 0: the users as a whole prefer the chosen side along it. We orient rather than give signed
weights so that pca is a drop-in LoRe basis: new users are fitted exactly as the LoRe entries fit
them (PersonalizeBatch on the simplex), and the checkpoints, basis tools and active selection are
the same. The cost: a direction that half of the users like and half dislike serves one half only.

Scale: each column is scaled so that the seen rows' root-mean-square margin on it is 1 / bt_scale
(100, LoRe's temperature): the Bradley-Terry logits of the fitted users are then of order 1, neither
all near 0.5 nor saturated, which is what the few-shot fit and the Laplace approximation of
lore.active expect.
"""
import torch

from lore.checks import InputError
from lore.methods import LinearBasis
from lore.stopping import FEWSHOT_CAP, STOPS


def second_moment(pairs, chunk_elements=1 << 24):
    """G = sum_i mean_{x in X_i} x x^T of the pairs (Pairs, rows or table form) -> [F, F] float64,
    accumulated over chunks of pairs (chunk_elements values of [chunk, F] rows at a time)."""
    F = pairs.n_features
    weight = (1.0 / pairs.counts()[pairs.user].double())                           # [P]: each user sums to 1
    G = torch.zeros(F, F, dtype=torch.float64, device=pairs.device)
    step = max(1, chunk_elements // F)
    for start in range(0, len(pairs.user), step):
        sl = slice(start, start + step)
        if pairs.X is not None:
            X = pairs.X[sl].double()                                               # [chunk, F]
        else:
            X = pairs.table[pairs.chosen[sl]].double() - pairs.table[pairs.rejected[sl]].double()  # [chunk, F]
        G += X.t() @ (weight[sl, None] * X)
    return G                                                                       # [F, F]


def principal_directions(pairs, K):
    """The top-K eigenvectors of G (see second_moment) by a dense float64 eigh: exact to rounding.
    -> (D [F, K] orthonormal columns, eigenvalues [K] in decreasing order)."""
    F = pairs.n_features
    if not 1 <= K <= F:
        raise InputError(f"pca: K must lie in [1, F={F}], got {K}")
    evals, evecs = torch.linalg.eigh(second_moment(pairs))                         # ascending
    top = torch.argsort(evals, descending=True)[:K]
    return evecs[:, top].float(), evals[top].float()                               # [F, K], [K]


def principal_basis(pairs, K, rms_margin):
    """The pca basis V [F, K]: principal_directions oriented so that the seen users' mean margin is
    >= 0 on each, and scaled so that the rows' root-mean-square margin on each is rms_margin."""
    D, evals = principal_directions(pairs, K)
    mean_margin = (pairs.project(D) / pairs.counts()[pairs.user, None].float()).sum(0)   # [K]: sum_i mean_i
    sign = torch.where(mean_margin < 0, -1.0, 1.0)                                 # [K]
    rms = (evals.clamp_min(1e-30) / pairs.n_users).sqrt()                          # [K]: x^T d over users' rows
    return D * (sign * rms_margin / rms)                                           # [F, K]


def least_squares_weights(Z, user, n_users, target, ridge=1e-3):
    """Each user's simplex weights from a least-squares fit of its pairs' margins to `target`:
    w_i = argmin_w sum_{p of i} (z_p^T w - target)^2 + ridge * tr(G_i) / K |w|^2, its negative
    entries set to 0 and the rest normalized to sum 1 (uniform where nothing is left). Vectorized:
    the normal equations of all users at once. Z [P, K] projections, user [P] -> [N, K]."""
    K = Z.shape[1]
    G = torch.zeros(n_users, K, K, device=Z.device, dtype=torch.float64)
    G.index_add_(0, user, (Z[:, :, None] * Z[:, None, :]).double())                # [N, K, K]
    b = torch.zeros(n_users, K, device=Z.device, dtype=torch.float64).index_add_(0, user, target * Z.double())
    eye = torch.eye(K, device=Z.device, dtype=torch.float64)
    lam = ridge * G.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-12) / K          # [N]
    w = torch.linalg.solve(G + lam[:, None, None] * eye, b).clamp_min(0)           # [N, K]
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-30), torch.full_like(w, 1.0 / K)).float()


class PCA(LinearBasis):
    """The top-K principal directions of the seen users' difference rows as the basis V [F, K] (see
    the module's docstring: uncentered, users weighed equally, oriented, scaled), found with no
    training loop; seen and new users' simplex weights fitted on it as LoRe fits new users
    (LinearBasis.fit_users, the recipe's --fewshot-iters --fewshot-lr)."""
    name, min_K, uses_alpha = "pca", 1, False
    defaults = {"fewshot_iters": 500, "fewshot_lr": 0.1, "fewshot_stop": "fixed"}
    choices = {"fewshot_stop": STOPS}   # the users' fits: fixed steps, or lore.stopping's rule
    recipe_hparams = ("fewshot_iters", "fewshot_lr", "fewshot_stop")
    # what lore.compare searches: K and the users' fit (the basis itself has nothing to tune)
    search, search_space = "random", {"K": [2, 3, 4, 5, 6, 8],
                                      "fewshot_iters": [FEWSHOT_CAP], "fewshot_lr": ("log", 0.03, 0.3),
                                      "fewshot_stop": ["early"]}

    def fit(self, pairs):
        self.V = principal_basis(pairs, self.K, 1.0 / self.bt_scale)  # [F, K]
        return self.fit_users(pairs)
