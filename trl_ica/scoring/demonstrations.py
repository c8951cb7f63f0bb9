"""Choosing the k holdout demonstrations of each candidate."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import unsharded_ancestors, zero3_gathered
from .models import backbone_and_head, eval_mode, execution_device, unwrap_causal_lm

#: An exact-kNN variant in one order shared by every candidate was measured and left out: `knn_grouped` shares more
#: of the prefixes and ranks as well (docs/benchmarks.md, "Choosing the demonstrations").
DEMO_SELECTIONS = ("knn", "knn_grouped", "fixed", "random")
NEAREST_SELECTIONS = ("knn", "knn_grouped")  # the ones that need an embedder
Embedder = Callable[[list[str]], np.ndarray]


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def _embedding_batches(lengths: list[int], batch_size: int | None, max_tokens: int) -> list[list[int]]:
    """Rows grouped into batches, longest first, each under the row cap and `max_tokens` padded tokens: the same
    batches whatever the number of processes, so that every process count gives the same numbers."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, start = [], 0
    while start < len(order):
        rows = max(1, max_tokens // max(1, lengths[order[start]]))
        if batch_size is not None:
            rows = min(rows, batch_size)
        batches.append(order[start : start + rows])
        start += rows
    return batches


@torch.no_grad()
def model_embeddings(
    model,
    tokenizer,
    texts: list[str],
    batch_size: int | None = None,
    show_progress: bool = False,
    *,
    max_batch_tokens: int | None = None,
    compute_dtype: torch.dtype | None = None,
    distributed: str | None = None,
) -> np.ndarray:
    """Mean-pooled last hidden states of `model` for each text, L2-normalised: `(len(texts), hidden)` float32.

    Runs where the model is, in batches of similar length under a padded-token budget (`max_batch_tokens`, by
    default the scoring engine's: 16384 on an accelerator, 2048 on the CPU) and `batch_size` rows at most, under
    autocast to `compute_dtype` when given. Under several processes (`distributed` as in [`score_requests`]:
    `"shard"` by default there) the batches are dealt out between the processes, each of which makes the same number
    of forwards (one-token ones when it has run out), as sharded models need, and every process gets every
    embedding; under `"lockstep"` each process embeds its own `texts` (possibly none) and gets their embeddings,
    making as many forwards as the process with the most batches; every process must call it.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .distributed import resolve_mode
    from .engine import ScoringBudget
    from .models import autocast_to, padded_batch

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    _, backbone, _ = backbone_and_head(model)
    device = execution_device(model)
    max_tokens = ScoringBudget(max_batch_tokens, "max_batch_tokens").resolve(device)
    ids = [tok(t, add_special_tokens=False)["input_ids"] or [0] for t in texts]
    batches = _embedding_batches([len(x) for x in ids], batch_size, max_tokens)
    mode = resolve_mode(distributed)
    rank, world = (0, 1) if mode == "local" else (PartialState().process_index, PartialState().num_processes)
    mine = batches if mode == "lockstep" else batches[rank::world]
    steps = -(-len(batches) // world)
    if mode == "lockstep":  # the processes' own texts differ: agree on the most forwards any of them makes
        import torch.distributed as dist

        count = torch.tensor([len(mine)], dtype=torch.long, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        steps = int(count)
    autocast = autocast_to(device, compute_dtype, next(backbone.parameters()).dtype)
    rows, pooled = [], []
    bar = tqdm(total=sum(map(len, mine)), desc="Embedding", disable=not show_progress, leave=False)
    with eval_mode(model), unsharded_ancestors(model, backbone), zero3_gathered(model), autocast:
        for step in range(steps):
            batch = mine[step] if step < len(mine) else None
            if batch is None:  # every process makes as many forwards as the one with the most batches
                backbone(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
                continue
            x, mask = padded_batch([ids[i] for i in batch], 0, device)
            hidden = backbone(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state.float()
            mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            pooled.append(torch.nn.functional.normalize(mean, dim=-1).cpu().numpy())
            rows += batch
            bar.update(len(batch))
    bar.close()
    config = unwrap_causal_lm(model).config
    hidden_size = (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size
    local = (rows, np.concatenate(pooled) if pooled else np.zeros((0, hidden_size), dtype=np.float32))
    parts = [local] if mode in ("local", "lockstep") else gather_object([local])
    out = np.zeros((len(texts), hidden_size), dtype=np.float32)
    for part_rows, values in parts:
        out[part_rows] = values
    return out


def sentence_embedder(name_or_path: str) -> Embedder:
    """An embedder from a sentence-transformers model name or local folder (`pip install trl_ica[sentence]`)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(
            f"`embedding_model={name_or_path!r}` needs sentence-transformers: pip install 'trl_ica[sentence]'."
        ) from error
    encoder = SentenceTransformer(name_or_path)
    return lambda texts: encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def select_demos(
    candidate_texts: list[str],
    holdout_texts: list[str],
    num_demos: int,
    method: str = "knn",
    seed: int = 0,
    embed: Embedder | None = None,
    exclude: np.ndarray | None = None,
    rows=None,
    holdout_vectors: np.ndarray | None = None,
) -> np.ndarray:
    """Indices into the holdout of each candidate's demonstrations, `(len(candidate_texts), num_demos)` int64.

    Args:
        candidate_texts (`list[str]`): the candidates' questions.
        holdout_texts (`list[str]`): the holdout questions.
        num_demos (`int`): k, at most the holdout size.
        method (`str`, *optional*, defaults to `"knn"`):
            `"knn"`: the k holdout questions nearest by cosine similarity, most similar first (ties: lower index).
            `"knn_grouped"`: the candidates are grouped by embedding (spherical k-means, `ceil(sqrt(N))` groups,
            seeded) and each group gets the k holdout questions nearest its centre, most similar first: one
            prefix per group.
            `"fixed"`: one seeded draw of k shared by every candidate (a single shared prefix).
            `"random"`: a seeded draw of k per candidate.
        seed (`int`, *optional*, defaults to `0`): seed of the draws.
        embed (`Callable[[list[str]], np.ndarray]`, *optional*): embedder, required for the `"knn*"` methods.
        exclude (`np.ndarray`, *optional*): `(len(candidate_texts),)` holdout row that must not be candidate i's
            demonstration (-1 for none): a holdout row scored as a candidate never sees itself. The `"knn*"` methods
            take the next nearest (to the candidate, or to its group's centre); `"fixed"` and `"random"` draw one
            more and skip it, so `"fixed"` stays one shared set for every candidate it does not concern. Needs
            `num_demos` below the holdout size.
        rows (`Sequence[int]`, *optional*): the candidates' ids in the whole training set, which seed the `"random"`
            draw of each (default: their positions here), so rows chosen a batch at a time get the draws they would
            get all at once.
        holdout_vectors (`np.ndarray`, *optional*): `(len(holdout_texts), d)` embeddings of the holdout questions
            already computed, used by the `"knn*"` methods instead of embedding them again (rows chosen a batch at
            a time embed the holdout once).
    """
    check_choice("demo_selection", method, DEMO_SELECTIONS)
    n, h = len(candidate_texts), len(holdout_texts)
    if not isinstance(num_demos, int) or num_demos < 1 or num_demos > h:
        raise ValueError(f"`num_demos` must be an integer in [1, {h}] (the holdout size), got {num_demos!r}.")
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
        if exclude.shape != (n,):
            raise ValueError(f"`exclude` must hold one holdout row per candidate ({n}), got shape {exclude.shape}.")
        if (exclude >= 0).any() and num_demos >= h:
            raise ValueError(
                f"`num_demos`={num_demos} demonstrations cannot leave out a candidate's own row from a holdout of "
                f"{h}: use at most {h - 1}, or a larger holdout."
            )
    else:
        exclude = np.full(n, -1, dtype=np.int64)

    def draw(rng, row: int) -> np.ndarray:
        """k rows from `rng`, the same k as without exclusion unless `row` is among them: then it is swapped for
        one more draw from the rows not drawn."""
        chosen = rng.choice(h, size=num_demos, replace=False)
        if row < 0 or row not in chosen:
            return chosen
        rest = np.setdiff1d(np.arange(h), chosen)
        return np.where(chosen == row, rng.choice(rest), chosen)

    if method == "fixed":
        # One shared set; only the candidates whose excluded row is in it get the set with that row swapped
        shared = draw(np.random.default_rng(seed), -1)
        chosen = np.tile(shared, (n, 1)).astype(np.int64)
        for i in np.flatnonzero((exclude >= 0) & np.isin(exclude, shared)):
            chosen[i] = draw(np.random.default_rng(seed), exclude[i])
        return chosen
    if method == "random":
        ids = range(n) if rows is None else [int(r) for r in rows]
        return (
            np.stack([draw(np.random.default_rng([seed, row]), exclude[i]) for i, row in enumerate(ids)]).astype(
                np.int64
            )
            if n
            else np.zeros((0, num_demos), dtype=np.int64)
        )
    if embed is None:
        raise ValueError(f"`demo_selection={method!r}` needs an embedder.")
    if holdout_vectors is not None and np.shape(holdout_vectors)[0] != h:
        raise ValueError(
            f"`holdout_vectors` must hold one row per holdout question ({h}), got {np.shape(holdout_vectors)[0]}."
        )
    hold = _unit(embed(holdout_texts) if holdout_vectors is None else holdout_vectors)
    cand = _unit(embed(candidate_texts))
    own = np.flatnonzero(exclude >= 0)
    if method == "knn_grouped":
        return _grouped(cand, hold, num_demos, exclude, seed)
    sims = cand @ hold.T  # (N, H)
    sims[own, exclude[own]] = -np.inf
    return np.argsort(-sims, axis=1, kind="stable")[:, :num_demos].astype(np.int64)


def _unit(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


def group_candidates(cand: np.ndarray, groups: int, seed: int, iterations: int = 50) -> np.ndarray:
    """Spherical k-means of unit vectors `cand` (N, D) into `groups` groups: the group of each row, `(N,)` int64.

    Seeded k-means++ starts, then alternating assignment (highest cosine similarity, ties to the lower group) and
    re-centring until no row moves; a group left empty restarts at the row farthest from its own centre."""
    n = len(cand)
    groups = min(groups, n)
    rng = np.random.default_rng(seed)
    centres = [cand[rng.integers(n)]]
    for _ in range(1, groups):
        distance = np.clip(1 - np.max(cand @ np.stack(centres).T, axis=1), 0, None)
        total = distance.sum()
        pick = rng.choice(n, p=distance / total) if total > 0 else rng.integers(n)
        centres.append(cand[pick])
    centres = np.stack(centres)
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(iterations):
        sims = cand @ centres.T
        new = np.argmax(sims, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for g in range(groups):
            members = cand[labels == g]
            if len(members) == 0:
                far = int(np.argmin(sims[np.arange(n), labels]))
                labels[far] = g
                members = cand[far : far + 1]
            centres[g] = _unit(members.sum(0, keepdims=True))[0]
    return labels


def _grouped(cand, hold, num_demos: int, exclude: np.ndarray, seed: int) -> np.ndarray:
    """`knn_grouped`: each group's k holdout rows nearest its centre; a member whose excluded row is among them gets
    the same list with that row replaced by the next nearest to the centre."""
    n = len(cand)
    if n == 0:
        return np.zeros((0, num_demos), dtype=np.int64)
    labels = group_candidates(cand, math.ceil(math.sqrt(n)), seed)
    chosen = np.zeros((n, num_demos), dtype=np.int64)
    for g in np.unique(labels):
        members = np.flatnonzero(labels == g)
        centre = _unit(cand[members].sum(0, keepdims=True))[0]
        ranked = np.argsort(-(hold @ centre), kind="stable")
        chosen[members] = ranked[:num_demos]
        for i in members[np.isin(exclude[members], ranked[:num_demos])]:
            chosen[i] = ranked[ranked != exclude[i]][:num_demos]
    return chosen
