"""qrobust.generate: builds the model-independent noise corpora (one module per
noise family; ``run`` plans and executes, ``writer`` writes shards)."""
