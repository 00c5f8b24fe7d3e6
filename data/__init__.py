"""Packaged data: the embedded byte-level corpus pydoc_topics.u8 that the default configs train on."""
