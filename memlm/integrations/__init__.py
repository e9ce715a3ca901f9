"""Adapters that let memlm drop into other RAG frameworks. Each imports its framework lazily:
install the framework to use its adapter (`pip install langchain-core`)."""
