"""Datasets as WebDataset shards: shard I/O, the sample format, batches, streams, building and checking."""
