import torch

from pensieve.cache.manager import TransferPlan
from pensieve.cache.transfer import KVTransfer, block_runs


def test_block_runs_merge_only_pairs_consecutive_on_both_sides():
    assert block_runs([]) == []
    assert block_runs([(4, 10), (5, 11), (6, 12), (9, 13), (10, 15), (11, 16)]) == [(4, 10, 3), (9, 13, 1), (10, 15, 2)]
    assert block_runs([(3, 7), (2, 8)]) == [(3, 7, 1), (2, 8, 1)]  # descending source: no run


def _tiers(layers=3, gpu_blocks=12, cpu_blocks=10):
    gpu = torch.randn(layers, gpu_blocks, 2, 4, 2, 8)
    cpu = torch.randn(layers, cpu_blocks, 2, 4, 2, 8)
    return gpu, cpu


def test_transfers_move_exact_blocks_by_runs_and_by_gather():
    pairs_in = [(0, 5), (1, 6), (2, 7), (7, 1), (3, 9)]     # cpu -> gpu, three runs
    pairs_out = [(10, 8), (11, 9), (2, 4)]                  # gpu -> cpu
    for max_runs in (0, 100):                              # 0: always the gather path
        gpu, cpu = _tiers()
        want_gpu, want_cpu = gpu.clone(), cpu.clone()
        for c, g in pairs_in:
            want_gpu[:, g] = cpu[:, c]
        for g, c in pairs_out:
            want_cpu[:, c] = gpu[:, g]
        t = KVTransfer(gpu, cpu, dma_max_runs=max_runs)
        assert t.start(TransferPlan(swap_in=pairs_in, swap_out=pairs_out)) is None  # CPU: synchronous
        t.settle(ran_forward=True)
        assert torch.equal(gpu, want_gpu) and torch.equal(cpu, want_cpu)
        assert t.completed_swap_outs() == 1


def test_deferred_swap_ins_take_the_copy_engines_only_when_asked():
    """A swap-in a forward waits on layer by layer may use the copy engines (few runs); a deferred one
    takes the one-launch kernel unless dma_deferred (the A/B of CacheConfig.swap_dma_deferred)."""
    gpu, cpu = _tiers()
    few_runs = [(0, 5), (1, 6), (2, 7)]                       # one run
    many_runs = [(0, 5), (2, 1), (4, 9)]                      # three runs
    plain = KVTransfer(gpu, cpu, dma_max_runs=2)
    assert plain._swap_in_copy(few_runs, used_now=True).use_dma
    assert not plain._swap_in_copy(few_runs, used_now=False).use_dma
    assert not plain._swap_in_copy(many_runs, used_now=True).use_dma   # over dma_max_runs: the kernel
    deferred = KVTransfer(gpu, cpu, dma_max_runs=2, dma_deferred=True)
    assert deferred._swap_in_copy(few_runs, used_now=False).use_dma
    assert not deferred._swap_in_copy(many_runs, used_now=False).use_dma
    # either way the blocks arrive: the CPU path runs the same copy synchronously
    want = gpu.clone()
    for c, g in few_runs:
        want[:, g] = cpu[:, c]
    deferred._swap_in_copy(few_runs, used_now=False).all_layers()
    assert torch.equal(gpu, want)
