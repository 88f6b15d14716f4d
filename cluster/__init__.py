"""Domain discovery: corpus ingestion, sentence embeddings, spherical k-means and cluster reports."""
