"""Planning a scoring run, without a model: the requests ([`LogProbRequest`]), the prefix tree of what their prefixes
share ([`plan_prefixes`]), the batches a token budget makes ([`batch_end`]), the forwards and tokens each way of
sharing runs ([`sharing_costs`], [`token_counts`]) and the cost model that chooses between them
([`choose_sharing`]). The engine ([`trl_ica.scoring.engine`]) runs what this plans."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class LogProbRequest:
    """Token ids of one scored sequence `prefix + context + response`; only `response` tokens are scored.

    Args:
        prefix (`tuple[int, ...]`): leading tokens that other requests may share; run once per distinct prefix.
        context (`tuple[int, ...]`): the request's own unscored tokens (its prompt).
        response (`tuple[int, ...]`): the scored tokens.
        scored (`tuple[int, ...]`, *optional*): the positions of `response` that are scored, in order, when not all
            of them are (a conversation's assistant turns between tool results); the others are read as context.
    """

    prefix: tuple[int, ...]
    context: tuple[int, ...]
    response: tuple[int, ...]
    scored: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.response:
            raise ValueError("LogProbRequest.response is empty: there is nothing to score.")
        if not self.prefix and not self.context:
            raise ValueError("LogProbRequest needs at least one prefix or context token to predict the response from.")
        if self.scored is not None:
            n = len(self.response)
            positions = list(self.scored)
            if not positions or positions != sorted(set(positions)) or not 0 <= positions[0] <= positions[-1] < n:
                raise ValueError(
                    f"LogProbRequest.scored must be increasing positions of the {n} response tokens, at least one, "
                    f"got {self.scored!r}."
                )

    @property
    def positions(self) -> Sequence[int]:
        """The scored positions of `response`."""
        return range(len(self.response)) if self.scored is None else self.scored

    @property
    def num_scored(self) -> int:
        return len(self.positions)

    @property
    def scored_ids(self) -> tuple[int, ...]:
        """The scored tokens."""
        return self.response if self.scored is None else tuple(self.response[k] for k in self.scored)

    @property
    def num_tokens(self) -> int:
        return len(self.prefix) + len(self.context) + len(self.response)


def batch_end(order: list[int], start: int, lengths, batch_size: int | None, max_tokens: int, prefix: int) -> int:
    """End of the batch starting at `order[start]` (sorted longest first) under a row cap and a token budget that
    counts, for each row, the `prefix` positions it attends to and its padded continuation (the keys and values one
    layer holds for the batch while it attends); a batch always holds at least one row."""
    longest = lengths[order[start]]
    rows = max(1, max_tokens // max(1, prefix + longest))
    if batch_size is not None:
        rows = min(rows, batch_size)
    return min(len(order), start + rows)


def _batches(lengths: list[int], prefix: int, batch_size: int | None, max_tokens: int) -> tuple[int, int]:
    """The forwards `_score_group` makes for continuations of `lengths` after a `prefix`, and the positions they run:
    each batch's rows padded to its longest."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    count = pos = padded = 0
    while pos < len(order):
        end = batch_end(order, pos, lengths, batch_size, max_tokens, prefix)
        padded += (end - pos) * lengths[order[pos]]
        count, pos = count + 1, end
    return count, padded


SHARINGS = ("auto", "tree", "flat", "none")


DEFAULT_OVERHEAD = {"cpu": 32.0}  # elsewhere (an accelerator): ACCELERATOR_OVERHEAD; see `score_requests`


ACCELERATOR_OVERHEAD = 256.0

#: On an accelerator, the per-forward cost of a model whose every forward dequantises its weights (4-bit) or gathers
#: them from other processes (FSDP, ZeRO-3): an estimate of about four weight reads, not a measurement;
#: `scripts/gpu_check.py` measures it (`forward_overhead="measure"` uses the measurement).
HEAVY_FORWARD_OVERHEAD = 1024.0


def default_overhead(device_type: str, heavy_forward: bool) -> float:
    """The per-forward cost `score_requests` charges when none is given: measured on the CPU, else the accelerator's,
    four times that for a model whose forwards dequantise or gather every weight (`heavy_forward`)."""
    if device_type in DEFAULT_OVERHEAD:
        return DEFAULT_OVERHEAD[device_type]
    return HEAVY_FORWARD_OVERHEAD if heavy_forward else ACCELERATOR_OVERHEAD


def sharing_costs(
    requests: Sequence[LogProbRequest], max_tokens: int, batch_size: int | None = None
) -> dict[str, tuple[int, int]]:
    """`(forwards, tokens)` each way of sharing would run for `requests` under the token budget: prefix pieces at
    batch 1 plus the batched continuations ([`score_requests`], `sharing`), each batch's rows counted padded to its
    longest."""
    out = {}
    for sharing in ("tree", "flat"):
        plan = plan_prefixes([r.prefix for r in requests], tree=sharing == "tree")
        forwards = sum(1 for node in plan.nodes if node)
        tokens = plan.piece_tokens
        for node, idx in plan.requests.items():
            if not idx:
                continue
            lengths = [
                len(requests[i].prefix) - len(node) + len(requests[i].context) + len(requests[i].response) for i in idx
            ]
            batches, padded = _batches(lengths, len(node), batch_size, max_tokens)
            forwards, tokens = forwards + batches, tokens + padded
        out[sharing] = (forwards, tokens)
    out["none"] = _batches([r.num_tokens for r in requests], 0, batch_size, max_tokens)
    return out


def choose_sharing(
    requests: Sequence[LogProbRequest], max_tokens: int, batch_size: int | None, overhead: float
) -> str:
    """The way of sharing with the least `forwards x overhead + tokens` ([`sharing_costs`]); ties go to the one
    that runs fewer tokens."""
    costs = sharing_costs(requests, max_tokens, batch_size)
    return min(costs, key=lambda name: (costs[name][0] * overhead + costs[name][1], costs[name][1]))


class TokenCounts(NamedTuple):
    """Tokens the forwards run for a list of requests, by three ways of running them.

    Attributes:
        naive: every request's full sequence on its own.
        flat: each distinct prefix once, plus every request's context and response (sharing whole prefixes only).
        tree: what [`score_requests`] runs: each piece of the prefix tree once ([`plan_prefixes`]), plus every
            request's tokens after its deepest shared piece.
        shared: distinct prefixes used by more than one request.
        pieces: prefix pieces run on their own (forwards before the batched ones).
    """

    naive: int
    flat: int
    tree: int
    shared: int
    pieces: int


def token_counts(requests: Sequence[LogProbRequest]) -> TokenCounts:
    """Token counts of the naive, flat-shared and prefix-tree ways of running `requests` ([`TokenCounts`])."""
    naive = sum(r.num_tokens for r in requests)
    groups: dict[tuple[int, ...], int] = {}
    for r in requests:
        groups[r.prefix] = groups.get(r.prefix, 0) + 1
    continuations = sum(len(r.context) + len(r.response) for r in requests)
    flat = continuations + sum(len(p) for p in groups)
    shared = sum(1 for p, c in groups.items() if p and c > 1)
    plan = plan_prefixes([r.prefix for r in requests])
    tree = (
        continuations
        + plan.piece_tokens
        + sum(len(requests[i].prefix) - len(node) for node, idx in plan.requests.items() for i in idx)
    )
    return TokenCounts(naive, flat, tree, shared, sum(1 for node in plan.nodes if node))


MIN_PIECE = 4  # tokens: a shared piece shorter than this is run again by each request rather than on its own


class PrefixPlan(NamedTuple):
    """How [`score_requests`] runs a list of prefixes ([`plan_prefixes`]).

    Attributes:
        nodes: the shared pieces' full prefixes in lexicographic order, `()` (no cached prefix) first; each node's
            parent is the longest earlier node that is a prefix of it, so the order is a depth-first walk.
        requests: for each node, the requests scored against it (their prefixes start with it and no deeper node).
        piece_tokens: tokens the pieces run (each node minus its parent).
        tree: whether a node extends its parent's cache (`False`: every node runs from the start).
    """

    nodes: list[tuple[int, ...]]
    requests: dict[tuple[int, ...], list[int]]
    piece_tokens: int
    tree: bool = True


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_prefixes(prefixes: Sequence[tuple[int, ...]], min_piece: int = MIN_PIECE, tree: bool = True) -> PrefixPlan:
    """The prefix tree of the parts that `prefixes` share.

    A request's deepest shared point is its longest common start with any other prefix, which is reached by a
    neighbour in sorted order (a whole prefix when it occurs twice); the branch points between those are the common
    starts of neighbouring points. A piece shorter than `min_piece` tokens below its parent is not run on its own:
    its requests and children go to the parent. Every prefix token of the tree is then run exactly once.

    `tree=False` shares whole prefixes only: a prefix used by two or more requests runs once, the others run in full
    with their requests.
    """
    n = len(prefixes)
    order = sorted(range(n), key=lambda i: prefixes[i])
    deepest = [0] * n
    for a, b in zip(order, order[1:]):
        common = _common(prefixes[a], prefixes[b])
        if not tree:
            common = common if len(prefixes[a]) == len(prefixes[b]) == common else 0
        deepest[a], deepest[b] = max(deepest[a], common), max(deepest[b], common)
    points = {prefixes[i][: deepest[i]] for i in range(n)}
    if tree:
        ordered = sorted(points)
        points.update(a[: _common(a, b)] for a, b in zip(ordered, ordered[1:]))
    else:
        min_piece = 1
    points.add(())
    nodes: list[tuple[int, ...]] = []
    home: dict[tuple[int, ...], tuple[int, ...]] = {}  # each point's deepest kept node (itself when kept)
    piece_tokens = 0
    stack: list[tuple[int, ...]] = []  # kept ancestors of the current point; () is first and stays
    for point in sorted(points):
        while stack and point[: len(stack[-1])] != stack[-1]:
            stack.pop()
        parent = stack[-1] if stack and tree else ()
        if point == () or len(point) - len(parent) >= min_piece:
            nodes.append(point)
            stack.append(point)
            piece_tokens += len(point) - len(parent)
            home[point] = point
        else:
            home[point] = parent
    requests: dict[tuple[int, ...], list[int]] = {node: [] for node in nodes}
    for i in range(n):
        requests[home[prefixes[i][: deepest[i]]]].append(i)
    return PrefixPlan(nodes, requests, piece_tokens, tree)
