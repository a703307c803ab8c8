"""Whole documents with their natural lengths: the data hybrid data parallelism balances.

A document is one file of the corpus, cut into pieces of at most ``max_len + 1`` bytes
(``max_len`` tokens with their next-byte targets); pieces shorter than two bytes hold no
token and are dropped. Step ``s`` takes pieces ``[s·G, (s+1)·G)`` of an order shuffled by
``seed`` and epoch, G the global batch in documents: a pure function of (seed, step),
independent of the layout and of which rank asks, so a run resumes exactly from its
cursor and every rank can compute the whole step's lengths (the balance scheduler's input)
without a collective.
"""

from __future__ import annotations

import torch

from plait.errors import ConfigError


def document_pieces(files: torch.Tensor, max_len: int) -> torch.Tensor:
    """int64 ``[n, 2]``: (start, bytes) of every piece of every file (``files``: (start, length) rows)."""
    if max_len < 1:
        raise ConfigError("data.max_len", max_len, "accepted: a positive number of tokens")
    piece = max_len + 1
    rows = []
    for start, length in files.tolist():
        for offset in range(0, length, piece):
            size = min(piece, length - offset)
            if size >= 2:
                rows.append((start + offset, size))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


def length_histogram(pieces: torch.Tensor, edges: list[int]) -> list[int]:
    """Pieces per token-length bin ``[edges[i], edges[i+1])`` (the last bin open-ended)."""
    tokens = pieces[:, 1] - 1
    out = []
    for i, low in enumerate(edges):
        high = edges[i + 1] if i + 1 < len(edges) else None
        mask = tokens >= low if high is None else (tokens >= low) & (tokens < high)
        out.append(int(mask.sum()))
    return out


class DocumentLoader:
    """Global batches of whole documents: every rank sees the same step (see the module)."""

    def __init__(self, tokens: torch.Tensor, pieces: torch.Tensor, *, global_batch: int, seed: int, max_len: int):
        if pieces.shape[0] < global_batch:
            raise ConfigError("train.global_batch", global_batch,
                              f"the corpus holds only {pieces.shape[0]} documents of at most data.max_len = "
                              f"{max_len} tokens")
        self.tokens = tokens
        self.pieces = pieces
        self.global_batch = global_batch
        self.seed = seed
        self.max_len = max_len
        self.cursor = 0  # documents consumed so far
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    @property
    def documents_per_epoch(self) -> int:
        return int(self.pieces.shape[0])

    def _piece(self, global_index: int) -> int:
        epoch, within = divmod(global_index, self.documents_per_epoch)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.documents_per_epoch, generator=gen)
            self._perm_epoch = epoch
        return int(self._perm[within])

    def step_lengths(self, step: int | None = None) -> list[int]:
        """Token lengths of the documents of step ``step`` (default: the next one), in batch order."""
        first = self.cursor if step is None else step * self.global_batch
        return [int(self.pieces[self._piece(first + i), 1]) - 1 for i in range(self.global_batch)]

    def documents(self, indices: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, targets)`` int64 of the next step's documents ``indices`` (default: all of them)."""
        picked = range(self.global_batch) if indices is None else indices
        out = []
        for i in picked:
            if not 0 <= i < self.global_batch:
                raise IndexError(f"document {i} of a step of {self.global_batch}")
            start, size = self.pieces[self._piece(self.cursor + i)].tolist()
            row = self.tokens[start:start + size].long()
            out.append((row[:-1], row[1:]))
        return out

    def advance(self) -> None:
        """The step is done: move to the next one."""
        self.cursor += self.global_batch

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "seed": self.seed, "max_len": self.max_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["max_len"] != self.max_len:
            raise ValueError(f"loader state was saved with seed={state['seed']}, max_len={state['max_len']}; this "
                             f"run has seed={self.seed}, max_len={self.max_len}")
        self.cursor = int(state["cursor"])
