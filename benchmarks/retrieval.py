"""Queries per second of the exact nearest-neighbour search over a random fc7-sized database.

  python benchmarks/retrieval.py [--database_size=100000] [--queries=1024] [--k=6]

The database (float32, 4096-d) is searched from memory in chunks, as a memmap would be;
the first search of the same shapes compiles and is not timed. Prints one JSON line.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alexnet_jax import retrieval  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--database_size", type=int, default=100_000)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--queries", type=int, default=1024)
  parser.add_argument("--k", type=int, default=6)
  parser.add_argument("--query_chunk", type=int, default=1024)
  parser.add_argument("--database_chunk", type=int, default=16384)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  database = rng.standard_normal((args.database_size, args.dim), np.float32)
  queries = rng.standard_normal((args.queries, args.dim), np.float32)
  chunks = dict(query_chunk=args.query_chunk, database_chunk=args.database_chunk)
  # Compiles the step for these chunk shapes (a one-chunk database pads to the same shapes).
  retrieval.nearest(queries[: args.query_chunk], database[: args.database_chunk], args.k, **chunks)
  start = time.perf_counter()
  retrieval.nearest(queries, database, args.k, **chunks)
  seconds = time.perf_counter() - start
  print(
    json.dumps(
      {
        "queries_per_sec": round(args.queries / seconds, 1),
        "seconds": round(seconds, 2),
        "queries": args.queries,
        "database": [args.database_size, args.dim],
        "k": args.k,
        "device": str(jax.devices()[0]),
        **chunks,
      }
    )
  )


if __name__ == "__main__":
  main()
