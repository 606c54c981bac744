import torch

from ibot.data.datasets import TensorImageDataset, slice_dataset, validation_split


def _dataset(n):
    return TensorImageDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2), torch.arange(n))


def test_slice_keeps_images_and_labels_together():
    part = slice_dataset(_dataset(20), 5, 9)
    assert len(part) == 4 and part.labels.tolist() == [5, 6, 7, 8]
    assert part.images[:, 0, 0, 0].tolist() == [5, 6, 7, 8]


def test_validation_split_takes_the_last_images_as_queries():
    bank, queries = validation_split(_dataset(60))  # small sets: a fifth are queries
    assert (len(bank), len(queries)) == (48, 12)
    assert bank.labels[-1] == 47 and queries.labels[0] == 48
    bank, queries = validation_split(_dataset(60), queries=10)
    assert (len(bank), len(queries)) == (50, 10)  # the 50k / 10k Fashion-MNIST split, scaled down
