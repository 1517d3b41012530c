"""How busy Ray Data keeps its task slots as a function of how long each task runs.

Tasks that only sleep (no CPU, so the machine's cores do not matter) on a private Ray instance with 8 logical CPUs:
the time over the ideal (tasks x length / slots) is what Ray Data's scheduling loop costs between one task and the
next. It is why `aipd scan` sizes its reading tasks to run for about a second (`serving.scan.default_files_per_task`).

    python benchmarks/ray_data_task_length.py
"""

from __future__ import annotations

import time

SLOTS = 8
WORK_S = 4.4  # each length gets the same total work per slot


def _sleep(batch: dict, seconds: float) -> dict:
    time.sleep(seconds)
    return batch


def main() -> None:
    import ray
    import ray.data

    ray.init(address="local", num_cpus=SLOTS, include_dashboard=False, log_to_driver=False)
    print("| task length ms | tasks | wall s | ideal s | slots busy |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for seconds in (0.037, 0.148, 0.3, 0.6, 1.18):
        tasks = round(WORK_S * SLOTS / seconds)
        dataset = ray.data.range(tasks, override_num_blocks=tasks).map_batches(
            _sleep, fn_kwargs={"seconds": seconds}, batch_size=None, num_cpus=1
        )
        started = time.perf_counter()
        for _ in dataset.iter_batches(batch_size=None):
            pass
        wall = time.perf_counter() - started
        ideal = tasks * seconds / SLOTS
        print(f"| {seconds * 1000:.0f} | {tasks} | {wall:.2f} | {ideal:.2f} | {ideal / wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
