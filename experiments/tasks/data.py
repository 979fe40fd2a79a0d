"""What every task's data module shares: fixed splits of in-memory tensors, a shuffle that
depends only on (seed, epoch), so that a run resumed from a checkpoint sees the same batches
as a run that was never interrupted, and evaluation shards without padding under DDP."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler, TensorDataset


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``seed + epoch``; Lightning calls
    :meth:`set_epoch` before every epoch, including the first epoch after a resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def split_indices(n: int, fractions: tuple[float, float], seed: int) -> tuple[torch.Tensor, ...]:
    """A seeded (train, val, test) split of ``range(n)``; ``fractions`` are (val, test)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(fractions[0] * n), round(fractions[1] * n)
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


class TensorDataModule(pl.LightningDataModule):
    """Base data module: subclasses implement :meth:`make_splits` returning three tuples of
    tensors (train, val, test); batches are tuples of tensors.

    Args:
        batch_size: training batch size (``None``: the whole training set, one step per epoch).
        eval_batch_size: validation/test batch size (``None``: the whole split).
        seed: seeds the data generation, the split and the per-epoch shuffle.
    """

    def __init__(self, batch_size: int | None = None, eval_batch_size: int | None = None,
                 seed: int = 0):
        super().__init__()
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.splits: dict[str, TensorDataset] | None = None

    def make_splits(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:  # deterministic: the same on every call and after a resume
            self.splits = dict(zip(("train", "val", "test"),
                                   (TensorDataset(*t) for t in self.make_splits())))

    def _loader(self, split: str, batch_size: int | None, shuffle: bool) -> DataLoader:
        data = self.splits[split]
        sampler = EpochShuffle(len(data), self.seed) if shuffle else None
        if split != "train" and self.trainer is not None and self.trainer.world_size > 1:
            sampler = self._eval_shard(split)  # (Lightning shards the training split)
        size = len(sampler or data) if batch_size is None else min(batch_size, len(data))
        return DataLoader(data, batch_size=size, sampler=sampler)

    def _eval_shard(self, split: str) -> UnrepeatedDistributedSampler:
        """Rank ``r`` of ``W`` evaluates samples ``r, r + W, ...``: every sample once.

        (Lightning's default ``DistributedSampler`` pads the shards to equal length by
        repeating samples, which would count those twice in the reduced metrics.) Every rank
        needs at least one sample, else it would skip the loop and leave the others waiting
        in the metrics' all-reduce.
        """
        world, n = self.trainer.world_size, len(self.splits[split])
        if n < world:
            raise ValueError(f"the {split} split has {n} samples, fewer than the {world} ranks "
                             f"that evaluate it: give it more samples or use fewer devices")
        return UnrepeatedDistributedSampler(self.splits[split], num_replicas=world,
                                            rank=self.trainer.global_rank, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=self.batch_size is not None)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


def _first(items):
    return items[0]


class WholeDataModule(pl.LightningDataModule):
    """Base data module whose every batch is the whole data set, a dict of tensors returned by
    :meth:`whole_batch` (after :meth:`setup`): ``steps_per_epoch`` training batches per epoch,
    one for validation and one for testing.

    Args:
        steps_per_epoch: optimizer steps per epoch.
    """

    def __init__(self, steps_per_epoch: int = 10):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch

    def whole_batch(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _loader(self, steps: int) -> DataLoader:
        return DataLoader([self.whole_batch()] * steps, batch_size=1, collate_fn=_first)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.steps_per_epoch)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(1)
