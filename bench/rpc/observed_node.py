"""``forge-node start`` for ``run.py --instructions``: forge-observe aggregates its event ring and writes
its queued spans when sent SIGUSR1 (then touches ``aggregated`` in the working directory) instead of
every 0.5 s (its timed writes are made hourly).

Under valgrind a request takes ~50x longer, so the 0.5 s aggregation would fold batches of tens of
``call`` events instead of the thousands it folds at full speed, and its fixed cost per batch would
count ~50x per request. As in bench/jobs/instructions.py, the measured requests' events are folded
once, at the end of the counted window, so the figure includes their aggregation at a realistic
batch size.
"""
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from forge_kernel.cli import main
from forge_observe import service

service.AGGREGATE_EVERY = 3600.0
_lifespan = service.Observer.lifespan


@contextlib.asynccontextmanager
async def lifespan(self, node):
    async with _lifespan(self, node) as obs:
        obs.writer.interval = 3600.0  # beyond [observe] write_interval's range: writes come with SIGUSR1
        tasks: set[asyncio.Task] = set()

        async def aggregate() -> None:
            obs.aggregate()
            # the spans of the sampled requests (1 %) are written now: their writing is counted in full,
            # and no timed write falls into one window and not another
            await obs.writer.write_pending()
            Path("aggregated").touch()

        def on_usr1() -> None:
            task = asyncio.create_task(aggregate())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, on_usr1)
        yield obs


service.Observer.lifespan = lifespan

if __name__ == "__main__":
    sys.exit(main())
