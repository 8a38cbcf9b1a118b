"""Personalized scoring with a fitted method: new users' weights from a handful of their (chosen,
rejected) pairs with the shared part fixed, and every user's reward of any candidate responses
(embeddings, or conversations embedded with the reward model)."""
import torch

from lore.checks import InputError, check_tensor, is_int
from lore.extract import embed_conversations
from lore.methods import chunked, method_features
from lore.pairs import Pairs, pack


def fit_new_users(method, chosen, rejected, user=None, n_users=None):
    """Fit new users' parameters (LoRe: simplex weights w [K]) from their preference pairs with the
    method's shared part fixed (a method from load_method, or just fitted), all users at once
    through the method's own fit_users (lore: PersonalizeBatch, the few-shot recipe of the
    checkpoint's hyperparameters). Seed the global generator (set_seed) for repeatable weights.

    chosen, rejected [P, F]: embeddings of pair p's chosen and rejected response; user [P]: its
    user in 0..N-1 (default: all one user), n_users N (default max(user) + 1; every user needs a
    pair). -> U [N, Q] float32 on the method's device."""
    F = method_features(method)
    chosen = check_tensor(chosen, "chosen", dim=2, features=F).float()            # [P, F]
    rejected = check_tensor(rejected, "rejected", dim=2, features=F).float()
    if chosen.shape != rejected.shape:
        raise InputError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must both be "
                         f"[P, F] with P >= 1")
    P = len(chosen)
    user = torch.zeros(P, dtype=torch.long) if user is None else torch.as_tensor(user)
    if user.shape != (P,) or user.is_floating_point() or user.dtype == torch.bool or user.min() < 0:
        raise InputError(f"user must hold one integer index >= 0 per pair ({P}), got {tuple(user.shape)} {user.dtype}")
    user = user.long().cpu()
    if n_users is None:
        n_users = int(user.max()) + 1
    elif not is_int(n_users) or n_users <= int(user.max()):
        raise InputError(f"n_users must be an integer above every user index (max {int(user.max())}), got {n_users!r}")
    differ = torch.bincount(user[(chosen != rejected).any(1).cpu()], minlength=n_users)        # [N]
    tied = torch.nonzero((torch.bincount(user, minlength=n_users) > 0) & (differ == 0)).flatten()
    if len(tied):   # no pair to learn from: its weights would be the random start
        raise InputError(f"user {int(tied[0])}: every pair's chosen and rejected have the same embedding (ties: "
                         f"nothing to fit){f' ({len(tied)} such users)' if len(tied) > 1 else ''}")
    order = torch.argsort(user, stable=True)    # Pairs wants each user's pairs contiguous
    table = torch.cat([chosen[order], rejected[order]])                            # [2P, F]
    pairs = pack(Pairs(user[order], n_users, table=table, chosen=torch.arange(P), rejected=torch.arange(P, 2 * P)),
                 "new users' pairs", method.device)
    return method.fit_users(pairs).float()                                         # [N, Q]


def score_items(method, embeddings, U):
    """Every user's reward of every item: embeddings [C, F] (any float dtype), U [N, Q] the users'
    parameters -> [N, C] float32 on the CPU. For LoRe, score[i, c] = phi_c^T V w_i."""
    U = check_tensor(U, "U", dim=2).float().to(method.device)                      # [N, Q]
    V = getattr(method, "V", None)
    if V is not None and U.shape[1] != V.shape[1]:
        raise InputError(f"U has {U.shape[1]} columns, the basis V of {method} {V.shape[1]}: weights of another fit?")
    embeddings = check_tensor(embeddings, "embeddings", dim=2, features=method_features(method))   # [C, F]
    with torch.no_grad():
        Z = chunked(method.item_features, embeddings.to(method.device))            # [C, D]
        N, C = len(U), len(Z)
        out = torch.empty(N, C)
        step = max(1, (1 << 20) // max(C, 1))  # users per block: [block * C, D] temporaries stay small
        for i in range(0, N, step):
            n = min(step, N - i)
            rewards = method.reward(Z.repeat(n, 1), U[i:i + n].repeat_interleave(C, 0))     # [n * C]
            out[i:i + n] = rewards.reshape(n, C).float().cpu()
    return out


def score_conversations(method, U, conversations, model_name_or_path, out_path, **embed_kwargs):
    """Embed conversations (lists of {"role", "content"}) with the reward model the method was
    fitted on (lore.extract.embed_conversations, cached in out_path) and score them for every user.
    -> (scores [N, C], embeddings [C, F])."""
    embeddings = embed_conversations(conversations, out_path, model_name_or_path, **embed_kwargs)   # [C, F]
    F_method = method_features(method)
    if F_method is not None and embeddings.shape[1] != F_method:
        raise InputError(f"the reward model {model_name_or_path} gives F={embeddings.shape[1]} but the "
                         f"checkpoint was fitted on F={F_method}: use the model its data was embedded with")
    return score_items(method, embeddings, U), embeddings
