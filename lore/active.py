"""Active selection of a new user's pairs: ask each user, in rounds, the question from its own pool
whose answer tells the most about its parameters (as PReF chooses its questions; Shenfeld et al.,
2025), every user at once.

The model. User i's parameters theta_i [D] are those its method's fit_users optimizes (LoRe's
entries and pca: the logits of its simplex weights, D = K); a pair's margin m(theta) is
free_margin(theta, zc, zr), and the user prefers the chosen side with probability
sigmoid(s m(theta)), s = bt_scale (1/100 for LoRe). The prior is Gaussian, theta ~ N(mean,
variance I) from free_prior (LoRe: N(0, I) on the logits, the distribution PersonalizeBatch
starts from: uniform weights on average).

The posterior given the revealed pairs R_i is approximated by a Gaussian (Laplace) at the fitted
parameters theta_i (the method's own fit on R_i; PersonalizeBatch has no prior term, so this is
the Laplace approximation of the likelihood around its fit, with the prior's precision added):
    H_i = I / variance + sum_{p in R_i} lambda_p g_p g_p^T,
    g_p = d m_p / d theta (torch.func),  lambda_p = s^2 sigmoid'(s m_p)
(the Fisher information of one Bradley-Terry answer, linearized at theta_i). A candidate q's
expected information is the gain in log det of the posterior precision its answer brings,
    info_q = log det(H_i + lambda_q g_q g_q^T) - log det H_i = log(1 + lambda_q g_q^T H_i^-1 g_q)
(D-optimal design; for a group of pairs asked together, a PRISM dialog, the log det gain of all of
its pairs). PReF's max_norm_vector ranks by sigmoid'(.)^2 v^T Sigma v, the same idea with the
weight squared. The criterion never reads the answer: swapping chosen and rejected negates m and
g, which leaves lambda and g^T H^-1 g unchanged. Ties (K = 1: nothing to learn) are broken at random.

Each round every user reveals its most informative unrevealed candidate (a user whose pool is
exhausted reveals nothing), the method refits every user on its revealed pairs (one fit_users,
vectorized over users), and the Laplace approximations are updated. The first round scores at the
prior mean (no answers yet). The candidates are the pool only: held-out pairs never reach this
module.
"""
import torch
from torch.func import grad, vmap

from lore.checks import InputError
from lore.methods import checked_fit_users, featurize, pair_features

SELECTIONS = ("random", "active")   # how a new user's shots are chosen: the paper's random draw, or this
_PROTOCOL = ("free_parameters", "free_margin", "free_prior", "bt_scale")


def check_active(method):
    """InputError unless the method answers active selection's questions (see Method's docstring)."""
    missing = [a for a in _PROTOCOL if not hasattr(method, a)]
    if missing:
        raise InputError(f"method {method.name} cannot choose pairs actively: it does not expose the "
                         f"gradient of a pair's margin in its user parameters ({', '.join(missing)}); "
                         f"use --select random for it")


def check_select(select):
    """A list of distinct selections of SELECTIONS."""
    if isinstance(select, str) or not select or any(s not in SELECTIONS for s in select) \
            or len(set(select)) != len(select):
        raise InputError(f"select must be a non-empty list of distinct values of {list(SELECTIONS)}, got {select!r}")
    return list(select)


def margin_gradients(method, theta, Zc, Zr):
    """Every candidate's margin and its gradient in its user's parameters: theta [P, D] (the
    parameters of each pair's user), Zc, Zr [P, .] item features -> (m [P], g [P, D])."""
    m = vmap(method.free_margin)(theta, Zc, Zr)                                    # [P]
    g = vmap(grad(method.free_margin))(theta, Zc, Zr)                              # [P, D]
    return m.detach(), g.detach()


def fisher_weight(method, m):
    """lambda = s^2 sigmoid'(s m): the information of one answer per unit of g g^T. m [P] -> [P]."""
    p = torch.sigmoid(method.bt_scale * m)
    return method.bt_scale ** 2 * p * (1 - p)


def posterior_precision(lam, g, user, n_users, variance, revealed):
    """H_i = I / variance + sum over user i's revealed pairs of lam g g^T -> [N, D, D] (float64)."""
    D = g.shape[1]
    outer = (lam[revealed, None, None] * g[revealed, :, None] * g[revealed, None, :]).double()  # [R, D, D]
    H = torch.eye(D, dtype=torch.float64, device=g.device).repeat(n_users, 1, 1) / variance
    return H.index_add_(0, user[revealed], outer)                                  # [N, D, D]


def information(lam, g, user, H, gid=None, n_groups=None):
    """Each candidate's expected information log det(H + A) - log det(H) under its user's posterior
    precision H [N, D, D]: for single pairs (gid None) log(1 + lam g^T H^-1 g) -> [P]; for groups
    (gid [P] the group of every pair, its groups' owners implied by user) the gain of all of a
    group's pairs at once -> [G]."""
    if gid is None:
        Sigma = torch.cholesky_inverse(torch.linalg.cholesky(H))                   # [N, D, D]
        gd = g.double()
        quad = torch.einsum("pd,pde,pe->p", gd, Sigma[user], gd)                   # [P]
        return torch.log1p(lam.double() * quad).float()
    outer = (lam[:, None, None] * g[:, :, None] * g[:, None, :]).double()          # [P, D, D]
    A = torch.zeros(n_groups, *H.shape[1:], dtype=torch.float64, device=g.device).index_add_(0, gid, outer)
    owner = torch.zeros(n_groups, dtype=torch.long, device=g.device).scatter_(0, gid, user.long())
    return (torch.logdet(H[owner] + A) - torch.logdet(H)[owner]).float()           # [G]


def pick_per_user(score, owner, n_users):
    """The best candidate of every user (ties at random, by torch's generator): score [G] (-inf:
    not available), owner [G] -> indices of the picked candidates (users with none available: none)."""
    order = torch.randperm(len(score), device=score.device)                        # random tie-break
    order = order[torch.argsort(score[order], descending=True, stable=True)]
    order = order[torch.argsort(owner[order], stable=True)]                        # by user, best first
    counts = torch.bincount(owner, minlength=n_users)
    first = order[(torch.cumsum(counts, 0) - counts)[counts > 0]]
    return first[torch.isfinite(score[first])]


def active_shots(method, pool, rounds):
    """Active selection on the unseen users' candidate pool (Pairs; groups, if any, are asked
    whole). Yields (n, revealed [P] bool mask of the pool, U [N, Q]: every user's fit on its
    revealed pairs) after rounds n = 1..rounds. The mask at n is a prefix of the one at n + 1."""
    check_active(method)
    pool = featurize(method, pool)                                                 # item features once
    Zc, Zr = pair_features(method, pool)                                           # [P, Dz]
    Zr = torch.zeros_like(Zc) if Zr is None else Zr   # difference rows: linear methods, reward(0) = 0
    N, user = pool.n_users, pool.user
    gid, owner = pool.groups() if pool.group is not None else (None, user)         # [P], [G]
    G = len(owner)
    mean, variance = method.free_prior()
    theta = mean.to(Zc.device).expand(N, -1)                                       # [N, D]: the prior mean
    asked = torch.zeros(G, dtype=torch.bool, device=user.device)
    for n in range(1, rounds + 1):
        m, g = margin_gradients(method, theta[user], Zc, Zr)                       # [P], [P, D]
        lam = fisher_weight(method, m)                                             # [P]
        revealed = asked if gid is None else asked[gid]                            # [P]
        H = posterior_precision(lam, g, user, N, variance, revealed)               # [N, D, D]
        score = information(lam, g, user, H, gid, G).masked_fill(asked, float("-inf"))   # [G]
        asked[pick_per_user(score, owner, N)] = True
        revealed = asked if gid is None else asked[gid]
        U = checked_fit_users(method, pool.select(revealed))                       # [N, Q]; its curve kept
        theta = method.free_parameters(U)
        yield n, revealed, U
