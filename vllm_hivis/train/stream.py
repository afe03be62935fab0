"""Training batches streamed from a dataset's shards, within a memory bound, resumable.

The dataset is never loaded whole: at any time at most ``resident`` shards are in memory, as
stored (hidden states fp16), and a record becomes a (fp32) training example only when a batch
draws it. Training walks the shards in *windows*: window w holds ``resident`` shards picked by a
seeded permutation of all shards (every shard once per cycle of windows), and lasts long enough to
draw about every record of the window once. The records of step s are a pure function of
(seed, rank, s), so a resumed run draws exactly the batches an uninterrupted one would.

Data parallelism: rank r of `world` draws only from the records ``i % world == r`` of each shard
(a split of the data that works for any number of shards). Records without an answer token (no
loss row) are never drawn.

Memory bound: ``resident`` x (largest shard's bytes), as listed in the manifest (`bound_bytes`).
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np

from .data import DataError, Manifest, read_shard


class ShardStream:
    def __init__(self, data_dir: str, manifest: Manifest, batch_size: int, seed: int = 0, rank: int = 0,
                 world: int = 1, resident: int = 4, max_records: int | None = None):
        self.dir, self.batch_size, self.seed, self.rank, self.world = Path(data_dir), batch_size, seed, rank, world
        shards = list(manifest.shards)
        if max_records is not None:  # the first shards holding max_records records
            kept, n = [], 0
            for sh in shards:
                if n >= max_records:
                    break
                kept.append(dict(sh, samples=min(sh["samples"], max_records - n)))
                n += kept[-1]["samples"]
            shards = kept
        if not shards:
            raise DataError(f"dataset {data_dir} lists no shards")
        self.shards = shards
        self.resident = max(1, min(resident, len(shards)))
        self.bound_bytes = self.resident * max(int(sh.get("bytes", 0)) for sh in shards)
        self._cache: collections.OrderedDict[int, list[dict]] = collections.OrderedDict()
        self.loads = 0  # shard files read so far (for tests and logs)
        windows = math.ceil(len(shards) / self.resident)
        per_window = sum(sh["samples"] for sh in shards) / windows / world
        self.window_steps = max(1, math.ceil(per_window / batch_size))

    def _window_shards(self, window: int) -> list[int]:
        cycle, k = divmod(window, math.ceil(len(self.shards) / self.resident))
        order = np.random.default_rng([self.seed, 7, cycle]).permutation(len(self.shards))
        return sorted(order[k * self.resident:(k + 1) * self.resident].tolist())

    def _records(self, shard: int) -> list[dict]:
        if shard not in self._cache:
            recs = read_shard(self.dir / self.shards[shard]["file"])[: self.shards[shard]["samples"]]
            self._cache[shard] = [r for i, r in enumerate(recs)
                                  if i % self.world == self.rank and len(r["input_ids"]) > r["prompt_len"]]
            self.loads += 1
            while len(self._cache) > self.resident:
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard)
        return self._cache[shard]

    def batch(self, step: int) -> list[dict]:
        """The records of training step `step` (as stored: fp16 hidden states)."""
        pool = [r for s in self._window_shards(step // self.window_steps) for r in self._records(s)]
        if not pool:
            raise DataError(f"dataset {self.dir}: rank {self.rank} of {self.world} finds no record with an answer "
                            "token in a window of shards (too few records per shard for this many workers?)")
        rng = np.random.default_rng([self.seed, self.rank, step])
        return [pool[i] for i in rng.integers(0, len(pool), self.batch_size)]
