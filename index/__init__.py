"""The memory store: chunking, embedding, FAISS indexes, LMDB storage (`memlm.index`)."""
