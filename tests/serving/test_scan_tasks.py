"""How `aipd scan` cuts a catalog into reading tasks: long enough that Ray Data's scheduler keeps every core busy,
many enough that a small catalog still spreads over the cores, and never more blocks than the driver should hold."""

from __future__ import annotations

from serving.scan import MAX_BLOCKS, MAX_FILES_PER_TASK, MIN_FILES_PER_TASK, default_files_per_task


def test_a_large_catalog_gets_the_longest_tasks() -> None:
    assert default_files_per_task(100_000, 16) == MAX_FILES_PER_TASK


def test_a_small_catalog_gets_four_tasks_a_cpu_at_least() -> None:
    files, cpus = 4_000, 16
    per_task = default_files_per_task(files, cpus)
    assert MIN_FILES_PER_TASK <= per_task < MAX_FILES_PER_TASK
    assert -(-files // per_task) >= 4 * cpus


def test_a_tiny_catalog_keeps_the_shortest_tasks() -> None:
    assert default_files_per_task(300, 4) == MIN_FILES_PER_TASK
    assert default_files_per_task(1, 0) == MIN_FILES_PER_TASK


def test_a_huge_catalog_never_makes_more_blocks_than_the_driver_holds() -> None:
    files = 10_000_000
    per_task = default_files_per_task(files, 16)
    assert -(-files // per_task) <= MAX_BLOCKS
