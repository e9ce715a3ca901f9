"""Adapters that let memlm drop into other RAG frameworks: `langchain` (retriever, vector store,
chat model) and `llama_index` (retriever, vector store, LLM); `filters` translates their metadata
filters into memlm's. Each module imports its framework when imported itself: install it to use
it (`pip install 'memlm[langchain]'`, `'memlm[llama-index]'`)."""
