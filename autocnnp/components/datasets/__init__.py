"""dataset_injection: data formats (<data format=...>, protocols.DataFormat)."""
