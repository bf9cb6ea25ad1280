"""Transcoders: one type, loaders for every common format, verification, and a trainer."""

from autolabel.transcoders.formats import load_transcoders, save_circuit_tracer
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

__all__ = ["Transcoder", "TranscoderSet", "load_transcoders", "save_circuit_tracer"]
