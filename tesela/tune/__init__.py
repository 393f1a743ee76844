"""GPU tuners that write tables the engine reads at run time: `python -m tesela.tune.gemv`
(layers/gemv_table.json) and `python -m tesela.tune.moe` (layers/moe/tile_configs.json)."""
