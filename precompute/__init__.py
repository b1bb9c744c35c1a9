"""Phase one: dataset + scorer models -> Parquet reward shards (`wspo-precompute`).

The package is also the API function: `wspo.precompute(RECIPE.yaml?, **keys) -> ShardSet` (see
wspo.api and docs/api.md).
"""

from wspo.api import make_callable

make_callable(__name__)
