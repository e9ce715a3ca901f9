"""`none` has no settings and keeps nothing per collection."""
