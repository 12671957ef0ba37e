"""Training order: seeded per epoch, grouped by length, and resumed mid-epoch at the right batch."""

import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from topk_lightning.data.sampling import EpochShuffleSampler, LengthGroupedSampler, ResumableDataLoader


def test_length_grouped_sampler():
    lengths = [int(x) for x in torch.randint(1, 1000, (400,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1, mega_batch_factor=10)
    first = list(sampler)
    assert sorted(first) == list(range(400))
    second = list(sampler)  # the next epoch: a new order
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first  # seeded
    # batches are homogeneous: the spread inside batches is far smaller than random batches' spread
    spread = [max(lengths[i] for i in first[b:b + 8]) - min(lengths[i] for i in first[b:b + 8])
              for b in range(0, 400, 8)]
    assert sum(spread) / len(spread) < 150


def test_epoch_shuffle_depends_only_on_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    torch.manual_seed(123)  # the global random state (dropout's) plays no part
    other = EpochShuffleSampler(50, seed=3)
    assert list(other) == first
    other.set_epoch(1)
    assert list(other) != first
    sampler.set_epoch(1)
    assert list(sampler) == list(other)
    assert list(EpochShuffleSampler(50, seed=4)) != first


def _loader(position, sampler):
    return ResumableDataLoader(list(range(20)), batch_size=3, sampler=sampler, position=position)


def test_resumable_loader_skips_the_batches_already_done_in_the_epoch():
    sampler = EpochShuffleSampler(20, seed=0)
    sampler.set_epoch(2)
    full = [batch.tolist() for batch in _loader(lambda: (None, 0), sampler)]
    assert len(full) == 7 and sorted(sum(full, [])) == list(range(20))
    fresh = EpochShuffleSampler(20, seed=0)  # epoch 0 until the loader sets it
    resumed = [batch.tolist() for batch in _loader(lambda: (2, 4), fresh)]
    assert resumed == full[4:]
    assert fresh.epoch == 2


def test_resumable_loader_reads_the_position_when_iteration_starts():
    position = {"value": (None, 0)}
    loader = _loader(lambda: position["value"], EpochShuffleSampler(20, seed=0))
    iterator = iter(loader)  # Lightning creates the iterator before it restores its counters
    position["value"] = (0, 5)
    assert len(list(iterator)) == 2  # 7 batches, 5 done


def test_resumable_loader_sets_the_epoch_through_a_ddp_wrapper():
    inner = LengthGroupedSampler([1] * 20, batch_size=3, seed=0)
    wrapper = DistributedSamplerWrapper(inner, num_replicas=2, rank=0, shuffle=False)
    loader = ResumableDataLoader(list(range(20)), batch_size=3, sampler=wrapper, position=lambda: (5, 0))
    list(loader)
    assert wrapper.epoch == 5
    assert inner.epoch == 6  # set to 5, then advanced once by its own iteration


def test_resumable_loader_declares_itself_stateful_to_lightning():
    from lightning.fabric.utilities.types import _Stateful

    loader = _loader(lambda: (None, 0), EpochShuffleSampler(20))
    assert isinstance(loader, _Stateful) and loader.state_dict() == {}
