"""benchmarks/proxies.py's SyncCounter: the syncs a CUDA run would pay, blocking host-to-device copies included,
counted on a CPU where the engine's device is the CPU (a ``torch.device`` is the engine's device, a ``"cpu"``
string the host; tensors made from host data are host tensors)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

DEVICE = torch.device("cpu")  # the engine's device in a proxy run


@pytest.fixture(scope="module")
def proxies():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "proxies.py"
    spec = importlib.util.spec_from_file_location("benchmark_proxies", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _count(proxies, fn) -> dict[str, int]:
    counter = proxies.SyncCounter()
    with counter:
        fn()
    return dict(counter.counts)


def test_tensors_made_on_the_device_from_host_data_are_counted(proxies):
    assert _count(proxies, lambda: torch.tensor([1.0, 2.0], device=DEVICE)) == {"h2d_data": 1}
    assert _count(proxies, lambda: torch.as_tensor(np.arange(3), device=DEVICE)) == {"h2d_data": 1}
    assert _count(proxies, lambda: torch.zeros(3, device=DEVICE).new_tensor([1, 2])) == {"h2d_data": 1}
    # on the host, or filled on the device without data: no copy
    assert _count(proxies, lambda: torch.tensor([1.0, 2.0])) == {}
    assert _count(proxies, lambda: torch.tensor([1.0], device="cpu")) == {}
    assert _count(proxies, lambda: torch.full((3,), 2.0, device=DEVICE) + torch.arange(3, device=DEVICE)) == {}


def test_host_tensors_moved_to_the_device_are_counted_where_they_are_moved(proxies):
    counter = proxies.SyncCounter()

    def moves():
        pixels = torch.from_numpy(np.zeros((4, 5, 3), np.uint8)).permute(2, 0, 1)  # host, and its view
        on_device = pixels.to(DEVICE)  # counted
        tokens = torch.zeros(2, 7, dtype=torch.long)  # a factory without a device: host
        tokens[0, :3] = torch.tensor([1, 2, 3])  # host into host: no copy
        tokens.to(DEVICE)  # counted
        if torch.cuda.is_available():
            tokens.to(DEVICE, non_blocking=True)  # counted: not pinned
        else:
            assert not counter.is_host(tokens.to(DEVICE, non_blocking=True))  # the pinned copy of a CUDA run
        (on_device.float() * 2).to(DEVICE)  # already on the device: nothing
        on_device.to(torch.float32)  # a dtype: nothing

    with counter:
        moves()
    assert dict(counter.counts) == {"h2d_copy": 2 + torch.cuda.is_available()}
    assert all(site.startswith("h2d_copy at tests/") or "test_sync_counter.py" in site for site in counter.sites)
    assert torch.from_numpy.__name__ == "from_numpy"  # unwrapped again


def test_copies_and_indexing_between_host_and_device(proxies):
    def copies():
        device = torch.zeros(4, device=DEVICE)
        host = torch.ones(4)
        device.copy_(host)  # h2d_copy
        host.copy_(device)  # d2h_copy
        device[1:3] = host[:2]  # h2d_copy
        device[0] = torch.tensor(5.0)  # a 0-dim host tensor: a scalar argument, no copy
        device[torch.arange(2)] = 1.0  # h2d_index
        device[[0, 2]]  # h2d_index
        device[torch.arange(2, device=DEVICE)]  # device indices: nothing
        host[torch.arange(2)]  # host indexing host: nothing

    assert _count(proxies, copies) == {"h2d_copy": 2, "d2h_copy": 1, "h2d_index": 2}


def test_device_to_host_syncs_are_still_counted_by_site(proxies):
    def syncs():
        x = torch.arange(6, device=DEVICE).float()
        x.sum().item()
        x.cpu()
        x.to("cpu")
        torch.nonzero(x > 2)
        x[x > 2]

    counter = proxies.SyncCounter()
    with counter:
        syncs()
    assert dict(counter.counts) == {"item": 1, "cpu": 1, "to_cpu": 1, "nonzero": 1, "bool_index": 1}
    assert counter.total == 5 and len(counter.sites) == 5


def test_the_run_lengths_of_masks_on_the_device_pay_one_sync_and_no_copy(proxies):
    from ovseg_mine import rle

    masks = [torch.rand(3, 6, 5, device=DEVICE) > 0.5, torch.rand(2, 4, 4, device=DEVICE) > 0.5]
    counter = proxies.SyncCounter()
    with counter:
        runs = rle.mask_runs(masks)
    assert dict(counter.counts) == {"nonzero": 1, "cpu": 1, "numpy": 1}  # one copy, counted by its three calls
    assert [len(r) for r in runs] == [3, 2]
