"""The training loader: a torch ``DataLoader`` over a tokenized split, a collator, and a seeded sampler
that resumes at the exact position.

:class:`StepSampler` yields the micro-batches of one process as lists of example indices: per epoch
a permutation seeded with ``(seed, epoch)``, cut into global micro-batches of ``micro * world``
examples (the ragged end of an epoch dropped), each split between the processes by rank, so N
processes see exactly the examples one process would see with the same global batch. Its state is
``(epoch, position)``; a run resumed from a checkpoint sets it and draws exactly the micro-batches
the uninterrupted run would have drawn. (``torch.utils.data.RandomSampler`` has no resumable state,
and Accelerate's ``skip_first_batches`` replays the skipped batches' indices instead of jumping.)

The loader uses no worker processes: a step's micro-batches are drawn when the step needs them,
so the sampler's state always names the next unseen micro-batch.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch

from rlkd_cli.data.dataset import collate
from rlkd_cli.errors import require


class StepSampler(torch.utils.data.Sampler):
    """Endless micro-batches of example indices for process ``rank`` of ``world``; resumable (see the module doc)."""

    def __init__(self, n: int, micro_batch: int, seed: int, rank: int = 0, world: int = 1):
        require(n >= micro_batch * world,
                f"the training split has {n} examples, fewer than one batch ({micro_batch * world}); "
                "lower trainer.batch_size or use more data")
        self.n, self.micro, self.seed, self.rank, self.world = n, micro_batch, seed, rank, world
        self.epoch, self.position = 0, 0
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> list[int]:
        """This process's indices of the next global micro-batch (advances the state)."""
        span = self.micro * self.world
        if self.position + span > self.n:  # drop the ragged end of an epoch
            self.epoch, self.position = self.epoch + 1, 0
        ids = self._permutation(self.epoch)[self.position: self.position + span].tolist()
        self.position += span
        return ids[self.rank * self.micro: (self.rank + 1) * self.micro]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class IndexedRows(torch.utils.data.Dataset):
    """A tokenized ``datasets.Dataset`` whose rows carry their index (``example_id``), fetched a batch at a time."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.ds[int(i)], "example_id": int(i)}

    def __getitems__(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        cols = self.ds[list(ids)]  # one Arrow read for the whole batch
        return [{"input_ids": a, "labels": b, "example_id": int(i)}
                for a, b, i in zip(cols["input_ids"], cols["labels"], ids)]


class Collator:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (:func:`rlkd_cli.data.dataset.collate`) plus
    ``example_ids`` (the rows' indices in their split, which a teacher cache is keyed by)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(rows, self.pad_token_id)
        batch["example_ids"] = torch.tensor([int(r["example_id"]) for r in rows], dtype=torch.long)
        return batch


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its eos."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    require(pad is not None, "the tokenizer has neither a pad nor an eos token; use a causal-LM tokenizer")
    return int(pad)


def train_loader(ds, *, micro_batch: int, seed: int, rank: int, world: int, pad_token_id: int
                 ) -> tuple[torch.utils.data.DataLoader, StepSampler]:
    """An endless ``DataLoader`` of collated micro-batches for this process, and its resumable sampler."""
    sampler = StepSampler(len(ds), micro_batch, seed, rank, world)
    loader = torch.utils.data.DataLoader(IndexedRows(ds), batch_sampler=sampler, collate_fn=Collator(pad_token_id),
                                         num_workers=0)
    return loader, sampler


def eval_batches(ds, *, batch_size: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Every example of ``ds`` in order, collated into batches of ``batch_size`` (the last one shorter)."""
    loader = torch.utils.data.DataLoader(IndexedRows(ds), batch_size=batch_size, shuffle=False,
                                         collate_fn=Collator(pad_token_id), num_workers=0)
    return list(loader)
