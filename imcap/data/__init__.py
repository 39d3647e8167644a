"""Datasets as WebDataset shards: sources, shard writing and checking, the reading pipeline, the demo set."""
