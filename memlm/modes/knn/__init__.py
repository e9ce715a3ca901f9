"""The `knn` memory mode: the model attends to its own keys and values of the collection's text
(Memorizing / Extended Mind Transformers).

- settings.py  `Settings` (how generations read, resource limits), `CollectionOptions` (what a
               collection's KV memory stores: layers, window, overlap, dtype; fixed at creation)
- mode.py      the mode: validation, the chunk-gated read plan, the generation context
- memories.py  `KVMemoryManager`: each collection's KV memory kept in step with the store (the
               lifecycle of memlm.modes.derived_memory)
- capture.py   running the model (owned Llama or transformers') over text into a `KVMemory`
               (memlm.index.kv_memory: the files)
- reading.py   `ReadConfig` + `PRESETS` (how one generation reads), `knn_mode` (the model in knn
               mode: `KnnBackend` on the owned Llama, an attention function on transformers')
- attention.py memory attention over FAISS / tensor stores (memlm.kernels underneath)
"""
