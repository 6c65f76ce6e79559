"""curvlab.memory: nbytes, check, budget and set_budget (the environment variable is tested elsewhere)."""

from __future__ import annotations

import pytest
import torch

from curvlab import memory


@pytest.fixture(autouse=True)
def _restore_budget():
    before = memory.get_budget()
    yield
    memory.set_budget(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.int64, torch.bool,
                                   torch.complex128])
@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 0, 4), (2, 3, 4)])
def test_nbytes_is_what_torch_allocates(shape, dtype):
    assert memory.nbytes(shape, dtype) == torch.empty(shape, dtype=dtype).nbytes


def test_nbytes_does_not_allocate():
    # 2^20 × 2^20 float64 = 8 TiB: computed, never allocated
    assert memory.nbytes((2**20, 2**20), torch.float64) == 8 * 2**40


def test_check_passes_up_to_the_budget_and_refuses_beyond():
    memory.set_budget(800)
    memory.check((10, 10), torch.float64, "x")  # exactly 800 bytes: allowed
    memory.check((10, 20), torch.float32, "x")
    with pytest.raises(memory.MemoryBudgetError) as err:
        memory.check((10, 11), torch.float64, "the test matrix")
    msg = str(err.value)
    assert isinstance(err.value, MemoryError)
    assert "the test matrix" in msg and "(10, 11)" in msg and "float64" in msg
    assert "880.0 B" in msg and "800.0 B" in msg
    assert "set_budget" in msg and 'structure="block"' in msg  # the default hint


def test_check_uses_a_custom_hint_and_readable_units():
    memory.set_budget(3 * 2**30)
    with pytest.raises(memory.MemoryBudgetError) as err:
        memory.check((2**16, 2**16), torch.float64, "H", hint="use fewer parameters")
    msg = str(err.value)
    assert "32.0 GiB" in msg and "3.0 GiB" in msg
    assert "use fewer parameters" in msg and 'structure="block"' not in msg


def test_set_budget_and_get_budget():
    memory.set_budget(12345)
    assert memory.get_budget() == 12345
    memory.set_budget(2.0**10)
    assert memory.get_budget() == 1024 and isinstance(memory.get_budget(), int)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=str(bad)):
            memory.set_budget(bad)
    assert memory.get_budget() == 1024  # a refused value leaves the budget unchanged


def test_budget_context_is_temporary_nests_and_restores_on_error():
    memory.set_budget(1000)
    with memory.budget(10):
        assert memory.get_budget() == 10
        with pytest.raises(memory.MemoryBudgetError):
            memory.check((2,), torch.float64, "y")
        with memory.budget(50):
            assert memory.get_budget() == 50
        assert memory.get_budget() == 10
    assert memory.get_budget() == 1000
    with pytest.raises(RuntimeError):
        with memory.budget(20):
            raise RuntimeError("inside")
    assert memory.get_budget() == 1000
    with pytest.raises(ValueError):
        with memory.budget(0):
            pass  # pragma: no cover
    assert memory.get_budget() == 1000
