"""Placeholder: written by the index work. Filter, Condition, parse_filter, MetadataIndex."""
