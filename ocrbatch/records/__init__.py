"""What a job has done: the SQLite checkpoint, the Parquet dataset, the output files, and reading them back."""
