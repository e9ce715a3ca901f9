"""The `rag` memory mode: the collection's best chunks for the prompt, put into the prompt."""
