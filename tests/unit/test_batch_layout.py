"""A resume at another process count: which batch layouts continue the checkpoint's experiment, and what the refusal
says (the real runs: tests/integration/test_distributed.py)."""

from __future__ import annotations

from diffusers_optim.config import BatchLayout, layout_changes, layout_refusal


def test_the_same_micro_batch_and_accumulation_continue_at_any_process_count():
    two = BatchLayout(4, 2, 1)
    assert two.same_experiment(BatchLayout(8, 1, 1)) and two.same_experiment(BatchLayout(1, 8, 1))
    assert layout_changes(two, BatchLayout(8, 1, 1)) == {}
    # the same global batch by accumulation is other noise (keyed by micro-batch): another experiment
    assert not two.same_experiment(BatchLayout(4, 1, 2))
    assert layout_changes(two, BatchLayout(4, 1, 2)) == {"num_processes": (2, 1)}
    assert layout_changes(two, BatchLayout(4, 1, 1)) == {"num_processes": (2, 1), "global_batch_size": (8, 4)}


def test_the_refusal_names_both_layouts_and_the_flags_that_continue():
    assert layout_refusal(BatchLayout(4, 2, 1), BatchLayout(4, 1, 1)) == (
        "checkpoint at global batch 8 (2 processes x 4); this launch gives 4 (1 process x 4): pass --train_batch_size 8 "
        "to continue the same experiment")
    assert layout_refusal(BatchLayout(4, 2, 2), BatchLayout(4, 1, 4)) == (
        "checkpoint at global batch 16 (2 processes x 4 x 2 accumulation steps); this launch gives 16 (1 process x 4 x "
        "4 accumulation steps): pass --train_batch_size 8 --gradient_accumulation_steps 2 to continue the same "
        "experiment")
    assert "does not split over 3 processes; resume on a process count that divides 8" in layout_refusal(
        BatchLayout(4, 2, 1), BatchLayout(4, 3, 1))
