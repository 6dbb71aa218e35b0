"""The data sharding the data-parallel strategies share: each rank reads its own shard of the dataset."""

from __future__ import annotations

from torch.utils.data import DistributedSampler


def shard_sampler(dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int) -> DistributedSampler:
    """Rank ``rank``'s shard of ``dataset`` split over ``num_replicas`` ranks (shuffled by ``seed`` when
    ``shuffle``; ``drop_last=False``: short shards are padded, so every rank takes the same number of steps)."""
    return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                              drop_last=False)
