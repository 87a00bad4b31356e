"""Datasets in one canonical form (``datasets``) from their sources (``sources``, ``imagefolder``); ``files`` is
the torch-free part the DAG build reads (data paths and content digests), so this package imports nothing here."""
