"""``extract_features_distributed`` over simulated ranks (a faked ``all_gather_object``)."""

import torch
import torch.distributed as dist
from PIL import Image

from ibot import distributed as D
from ibot.eval import knn


class _Files:
    """A file dataset of ``n`` tiny images, label = index; ``bad`` indices are unreadable (``None``)."""

    def __init__(self, n, bad):
        self.n, self.bad, self.labels = n, set(bad), torch.arange(n)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            return None
        return Image.new("RGB", (8, 8), (20 * i, 255 - 20 * i, 7 * i)), i


def _encode(x):
    return x.flatten(1)[:, ::7] + 0.1


def test_an_unreadable_image_in_the_overlap_does_not_duplicate_an_image(monkeypatch):
    """Issue 25 item 7: 10 images on 3 ranks (shards 0-3, 4-7, 6-9), image 5 unreadable: rows counted
    from the shard start kept image 7 twice; rows are now told apart by their dataset position."""
    ds, world = _Files(10, bad=[5]), 3
    kw = dict(image_size=8, in_chans=3, batch_size=3)
    shards, rank = {}, [0]
    monkeypatch.setattr(D, "is_dist", lambda: True)
    monkeypatch.setattr(D, "world_size", lambda: world)
    monkeypatch.setattr(D, "rank", lambda: rank[0])

    def gather(parts, local):  # pass 1 records each rank's shard; pass 2 hands every rank all of them
        shards[rank[0]] = local
        parts[:] = [shards.get(r, local) for r in range(world)]

    monkeypatch.setattr(dist, "all_gather_object", gather)
    for r in range(world):
        rank[0] = r
        knn.extract_features_distributed(_encode, ds, **kw)
    single_f, single_y = knn.extract_features(_encode, ds, **kw)
    assert single_y.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    for r in range(world):
        rank[0] = r
        feats, labels = knn.extract_features_distributed(_encode, ds, **kw)
        assert labels.tolist() == single_y.tolist()  # each image once, in dataset order
        torch.testing.assert_close(feats, single_f)
