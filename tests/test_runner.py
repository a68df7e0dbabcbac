"""Joining a cluster that scales its GPU nodes from zero: the driver asks the autoscaler for the
workers it needs, waits for them within ray.scale_up_timeout_s, then withdraws the request."""

import pytest

from rae_core.errors import ConfigError
from rae_core.train.runner import wait_for_resources

BUNDLE = {"CPU": 8, "GPU": 1}


class FakeCluster:
    """cluster_resources() that grows to `grown` after `polls` reads; request_resources calls."""

    def __init__(self, start: dict, grown: dict | None = None, polls: int = 0):
        self.start, self.grown, self.polls, self.reads, self.requests = start, grown, polls, 0, []

    def available(self) -> dict:
        self.reads += 1
        return self.grown if self.grown is not None and self.reads > self.polls else self.start

    def request(self, bundles):
        self.requests.append(bundles)


def test_a_cluster_that_already_fits_is_used_without_asking_the_autoscaler():
    c = FakeCluster({"CPU": 64, "GPU": 8})
    wait_for_resources(BUNDLE, 8, c.available, c.request, timeout_s=100, address="a")
    assert c.requests == [] and c.reads == 1


def test_without_a_timeout_a_small_cluster_stops_at_once_naming_need_and_have():
    c = FakeCluster({"CPU": 16, "GPU": 0})
    with pytest.raises(ConfigError) as e:
        wait_for_resources(BUNDLE, 8, c.available, c.request, timeout_s=0, address="10.0.0.1:6380")
    msg = str(e.value)
    assert "64 CPU (it has 16)" in msg and "8 GPU (it has 0)" in msg
    assert "10.0.0.1:6380" in msg and "ray.scale_up_timeout_s" in msg
    assert len(msg.splitlines()) == 1
    assert c.requests == []


def test_the_driver_asks_for_its_workers_waits_for_them_then_withdraws_the_request():
    c = FakeCluster({"CPU": 0}, grown={"CPU": 64, "GPU": 8}, polls=3)
    wait_for_resources(BUNDLE, 8, c.available, c.request, timeout_s=60, address="a",
                       poll_s=0.001)
    assert c.requests == [[BUNDLE] * 8, []]
    assert c.reads == 4  # the first look, then polls until the nodes are there


def test_nodes_that_never_come_end_the_wait_with_the_request_withdrawn():
    c = FakeCluster({"CPU": 8, "GPU": 1})
    with pytest.raises(ConfigError, match=r"waited 0.05 s"):
        wait_for_resources(BUNDLE, 2, c.available, c.request, timeout_s=0.05, address="a",
                           poll_s=0.001)
    assert c.requests == [[BUNDLE] * 2, []]


def test_only_the_resources_the_run_uses_are_waited_for():
    c = FakeCluster({"CPU": 4})  # a CPU-only run does not wait for GPUs it does not use
    wait_for_resources({"CPU": 2}, 2, c.available, c.request, timeout_s=0, address="a")
    assert c.requests == []


def _folder(root, train: int, val: int):
    for split, n in (("train", train), ("val", val)):
        for c in range(n):
            (root / split / f"c{c}").mkdir(parents=True)
    return root


def test_a_dataset_link_is_seen_through_to_its_target(tmp_path):
    from rae_core.train.runner import dataset_view

    target = _folder(tmp_path / "shared" / "ilsvrc", 3, 3)
    link = tmp_path / "project" / "data" / "imagenet"
    link.parent.mkdir(parents=True)
    link.symlink_to(target, target_is_directory=True)
    view = dataset_view(str(link))
    assert view["target"] == str(target.resolve()) and (view["train"], view["val"]) == (3, 3)
    assert dataset_view(str(tmp_path / "nowhere"))["train"] == -1


def test_a_worker_that_sees_another_dataset_is_refused_in_one_line(tmp_path):
    from rae_core.errors import DataError
    from rae_core.train.runner import compare_dataset_views, dataset_view

    shared = dataset_view(str(_folder(tmp_path / "shared", 10, 10)))
    compare_dataset_views(shared, {**shared, "node": "gpu-1"}, "data.source=/mnt/shared/x")
    # the link leads to a folder the worker's node does not have
    missing = {"node": "gpu-1", "target": shared["target"], "train": -1, "val": -1}
    with pytest.raises(DataError) as e:
        compare_dataset_views(shared, missing, "data.source=/home/me/digits")
    msg = str(e.value)
    assert msg.startswith("data.source=/home/me/digits: Ray worker node gpu-1 sees")
    assert "-1 train" in msg and "/mnt/shared" in msg and len(msg.splitlines()) == 1
    # a node-local copy with other classes is refused too
    other = {**shared, "node": "gpu-2", "train": 9}
    with pytest.raises(DataError, match="gpu-2"):
        compare_dataset_views(shared, other, "data.source=/data/local")
