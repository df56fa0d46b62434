"""Queries per second of the exact nearest-neighbour search over a random fc7-sized database.

  python benchmarks/retrieval.py [--database_size=100000] [--queries=1024] [--k=6]

The database (float32, 4096-d) is searched from memory in chunks, as a memmap would be;
the first search of the same shapes compiles and is not timed. Prints one JSON line.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import flags

# The package is not installed: `python benchmarks/retrieval.py` puts benchmarks/ on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alexnet_jax.analysis import retrieval  # noqa: E402
from alexnet_jax.core import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_integer("database_size", 100_000, "Rows in the random database.")
  flags.DEFINE_integer("dim", 4096, "Feature dimension (fc7: 4096).")
  flags.DEFINE_integer("queries", 1024, "Queries searched (timed).")
  flags.DEFINE_integer("k", 6, "Neighbours per query.")
  flags.DEFINE_integer("query_chunk", 1024, "Queries per device step.")
  flags.DEFINE_integer("database_chunk", 16384, "Database rows per device step.")


def main() -> None:
  rng = np.random.default_rng(0)
  database = rng.standard_normal((FLAGS.database_size, FLAGS.dim), np.float32)
  queries = rng.standard_normal((FLAGS.queries, FLAGS.dim), np.float32)
  chunks = dict(query_chunk=FLAGS.query_chunk, database_chunk=FLAGS.database_chunk)
  # Compiles the step for these chunk shapes (a one-chunk database pads to the same shapes).
  retrieval.nearest(
    queries[: FLAGS.query_chunk], database[: FLAGS.database_chunk], FLAGS.k, **chunks
  )
  start = time.perf_counter()
  retrieval.nearest(queries, database, FLAGS.k, **chunks)
  seconds = time.perf_counter() - start
  print(
    json.dumps(
      {
        "queries_per_sec": round(FLAGS.queries / seconds, 1),
        "seconds": round(seconds, 2),
        "queries": FLAGS.queries,
        "database": [FLAGS.database_size, FLAGS.dim],
        "k": FLAGS.k,
        "device": str(jax.devices()[0]),
        **chunks,
      }
    )
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
