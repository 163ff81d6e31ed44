"""Producers: the edges that turn facts from vSphere into events on Kafka."""
